"""Webdataset shards, written reproducibly and read without pickle.

A shard is a tar file whose members are `<key>.<ext>`; the members of one sample are adjacent. Writing
uses fixed metadata (mtime 0, uid/gid 0, no user names) so the same samples give the same bytes, and a
temporary name then os.replace (webdataset's own ShardWriter stamps the time and writes the final name).
Reading goes through tarfile (local paths) or webdataset's gopen (URLs) and hands back raw bytes: no
decoder, so no pickle ever runs.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from braceexpand import braceexpand

from pipeline import faults
from pipeline.errors import UserError
from pipeline.files import fsync_dir

_KEY_OK = re.compile(r"^[A-Za-z0-9_\-/]+$")


def check_key(key: str) -> str:
    """Keys become file names: no dots (webdataset splits at the first), no absolute or parent paths."""
    if not key or not _KEY_OK.match(key) or key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"unsafe sample key {key!r}")
    return key


def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, bytes]]) -> int:
    """Write samples ({"__key__": key, ext: bytes, ...}) to a tar at `path`, atomically. Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for sample in samples:
                    key = check_key(sample["__key__"])
                    for ext, data in sample.items():
                        if ext == "__key__":
                            continue
                        if isinstance(data, str):
                            data = data.encode("utf-8")
                        ti = tarfile.TarInfo(f"{key}.{ext}")
                        ti.size = len(data)
                        ti.mtime = 0
                        ti.mode = 0o444
                        ti.uid = ti.gid = 0
                        ti.uname = ti.gname = ""
                        tar.addfile(ti, io.BytesIO(data))
                    n += 1
                    faults.point("shard")
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return n


def expand_urls(urls: str) -> list[str]:
    out = []
    for part in urls.split("::"):
        out.extend(braceexpand(part.strip()))
    return out


def _open(url: str, allow_pipe: bool):
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise UserError(f"{url}: pipe: URLs run a shell command; set allow_pipe: true on the source to allow it")
    if "://" in url or url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    p = Path(url)
    if not p.is_file():
        raise UserError(f"shard not found: {url}")
    return open(p, "rb")


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile reads a corrupt, cut or missing header in mid-archive as the end of the archive, silently
    dropping every sample after it. This remembers why reading stopped, so that iter_shard can tell a shard
    that ended from one that broke."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the end-of-archive zero block: a proper end
            raise
        except tarfile.EmptyHeaderError as e:
            tar.broken_at = f"the shard ends without the end-of-archive marker (truncated?): {e}"
            raise
        except tarfile.HeaderError as e:
            tar.broken_at = f"bad tar header: {e}"
            raise


def iter_shard(url: str, allow_pipe: bool = False,
               on_error: Callable[[str, str], None] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) per sample. A corrupt member or a truncated tar ends the shard early and is
    reported through on_error(key_or_url, reason); what was read before it is still yielded."""
    stream = _open(url, allow_pipe)
    cur_key, cur = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            while True:
                try:
                    ti = tar.next()
                except (tarfile.TarError, OSError, EOFError) as e:
                    if on_error:
                        on_error(f"{url}:{cur_key or ''}", f"corrupt tar member after {cur_key!r}: {e}")
                    break
                if ti is None:
                    broken = getattr(tar, "broken_at", None)
                    if broken and on_error:
                        on_error(f"{url}:{cur_key or ''}", f"corrupt tar member after {cur_key!r}: {broken}")
                    break
                if not ti.isfile():
                    continue
                name = ti.name
                base = name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                prefix = name[: len(name) - len(base)]
                stem, ext = base.split(".", 1)
                key = prefix + stem
                try:
                    check_key(key)
                except ValueError as e:
                    if on_error:
                        on_error(f"{url}:{name}", str(e))
                    continue
                try:
                    f = tar.extractfile(ti)
                    data = f.read() if f else b""
                    if len(data) != ti.size:
                        raise EOFError("member truncated")
                except (tarfile.TarError, OSError, EOFError) as e:
                    if on_error:
                        on_error(f"{url}:{name}", f"corrupt tar member {name}: {e}")
                    break
                if key != cur_key:
                    if cur_key is not None:
                        yield cur_key, cur
                    cur_key, cur = key, {}
                cur[ext] = data
    except tarfile.ReadError as e:
        if on_error:
            on_error(url, f"not a readable tar file: {e}")
    finally:
        stream.close()
    if cur_key is not None:
        yield cur_key, cur


def list_shards(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).glob("*.tar") if not p.name.startswith("."))
