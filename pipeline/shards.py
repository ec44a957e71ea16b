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
                        tar.format = _header_format(ti, tar)
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


def _header_format(ti: tarfile.TarInfo, tar: tarfile.TarFile) -> int:
    """USTAR wherever its header holds the member (a name up to 100 characters, or 255 split at a slash), so
    every shard that could be written before is written byte for byte as it was; a PAX header otherwise, which
    holds a name of any length (tarfile and webdataset read both)."""
    try:
        ti.tobuf(tarfile.USTAR_FORMAT, tar.encoding, tar.errors)
        return tarfile.USTAR_FORMAT
    except ValueError:
        return tarfile.PAX_FORMAT


def expand_urls(urls: str) -> list[str]:
    out = []
    for part in urls.split("::"):
        out.extend(braceexpand(part.strip()))
    return out


# URL schemes that webdataset's gopen serves by starting a program (curl, gsutil, ais, the shell): a shards
# source may use them only with allow_pipe, as for pipe: itself.
_COMMAND_SCHEMES = ("pipe", "http", "https", "sftp", "ftps", "scp", "gs", "htgs", "hf", "ais", "s3")
# Per input shard: a member's declared size, and the members' sizes together, read at most (bytes). A member
# is refused from its header, before a byte of it is read, so a small compressed shard cannot claim gigabytes.
MAX_MEMBER_BYTES = 512 << 20
MAX_SHARD_BYTES = 2 << 30


def _scheme(url: str) -> str:
    head = url.split(":", 1)[0] if ":" in url else ""
    return head.lower() if head.isalnum() and len(head) > 1 else ""


def command_scheme(urls: str) -> str | None:
    """The first scheme among `urls` (brace-expanded, `::`-separated) that starts a program, else None."""
    for url in expand_urls(urls):
        if _scheme(url) in _COMMAND_SCHEMES:
            return _scheme(url)
    return None


def _open(url: str, allow_pipe: bool):
    scheme = _scheme(url)
    if scheme in _COMMAND_SCHEMES and not allow_pipe:
        what = "pipe: URLs run a shell command" if scheme == "pipe" else f"{scheme}: URLs start a download program"
        raise UserError(f"{url}: {what}; set allow_pipe: true on the source to allow it")
    if scheme:
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
            tar.broken_offset = None  # nothing follows: what was cut off cannot be counted
            raise
        except tarfile.HeaderError as e:
            tar.broken_at = f"bad tar header: {e}"
            tar.broken_offset = tar.offset
            raise


def _split_name(name: str) -> tuple[str, str] | None:
    """A member name -> (key, ext), or None for a name without an extension (not a sample member)."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return name[: len(name) - len(base)] + stem, ext


def _keys_after(url: str, offset: int, seen: set[str]) -> int | None:
    """How many samples not yet seen have a readable header after a break at `offset` of a plain local tar:
    every 512-byte block is tried as a header, and a valid one's data is skipped. None where the shard is not
    a plain local file (a compressed or remote stream cannot be searched)."""
    p = Path(url)
    if _scheme(url) or not p.is_file():
        return None
    lost: set[str] = set()
    try:
        with open(p, "rb") as f:
            if f.read(2) == b"\x1f\x8b":
                return None
            size = p.stat().st_size
            pos = offset + 512
            while pos + 512 <= size:
                f.seek(pos)
                try:
                    ti = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape")
                except tarfile.HeaderError:
                    pos += 512
                    continue
                got = _split_name(ti.name) if ti.isreg() else None
                if got and got[0] not in seen:
                    lost.add(got[0])
                pos += 512 + (-(-ti.size // 512) * 512 if ti.isreg() else 0)
    except OSError:
        return None
    return len(lost)


def iter_shard(url: str, allow_pipe: bool = False, on_error: Callable[..., None] | None = None,
               max_member_bytes: int = MAX_MEMBER_BYTES,
               max_shard_bytes: int = MAX_SHARD_BYTES) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) per sample, reading at most max_member_bytes per member (checked against its
    header before reading) and max_shard_bytes in all. Whatever is refused is reported through
    on_error(where, reason, lost): a sample with a bad, oversized or duplicate member or key is one (lost=1);
    a corrupt or truncated tar ends the shard early, with lost the number of samples counted after the break
    (None where that cannot be known: a stream, or a cut file); what was read before it is still yielded."""
    report = on_error or (lambda where, reason, lost=1: None)
    stream = _open(url, allow_pipe)
    seen: set[str] = set()  # keys of samples started, yielded or refused
    cur_key, cur, cur_bad = None, {}, None
    total = 0
    failed = None  # why the shard as a whole could not be read

    def finish():
        if cur_key is not None and cur_bad:
            report(f"{url}:{cur_key}", cur_bad, 1)
        return cur_key is not None and not cur_bad

    def broken(tar, why: str, after: str | None):
        offset = getattr(tar, "broken_offset", None)
        lost = _keys_after(url, offset, seen) if offset is not None else None
        say = f"; {lost} sample(s) after it lost" if lost is not None else "; any samples after it are lost"
        report(f"{url}:{after or ''}", f"corrupt tar member after {after!r}: {why}{say}", lost)

    def skip_rest(tar, why: str):
        """Stop reading data: count the samples left from their headers (the stream skips their bytes)."""
        left = set()
        while True:
            try:
                ti = tar.next()
            except Exception:
                ti = None
            if ti is None:
                break
            got = _split_name(ti.name) if ti.isfile() else None
            if got and got[0] not in seen:
                left.add(got[0])
        if left:
            report(url, f"{why}; {len(left)} sample(s) after it refused unread", len(left))

    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            while True:
                try:
                    ti = tar.next()
                    why = getattr(tar, "broken_at", None) if ti is None else None
                except (tarfile.TarError, OSError, EOFError) as e:
                    ti, why = None, str(e)
                if ti is None:
                    if finish():
                        yield cur_key, cur
                    after, cur_key = cur_key, None
                    if why:
                        broken(tar, why, after)
                    break
                if not ti.isfile():
                    continue
                name = ti.name
                got = _split_name(name)
                if got is None:
                    continue
                key, ext = got
                try:
                    check_key(key)
                except ValueError as e:
                    report(f"{url}:{name}", str(e), 1)
                    continue
                if key != cur_key:
                    if finish():
                        yield cur_key, cur
                    cur_key, cur = key, {}
                    cur_bad = (f"duplicate key {key!r}: an earlier sample of the shard has it (two samples share "
                               "the key, or its members are not adjacent)") if key in seen else None
                    seen.add(key)
                if cur_bad:
                    continue
                if ext in cur:
                    cur_bad, cur = f"duplicate member {name} in the shard", {}
                    continue
                if ti.size > max_member_bytes:
                    cur_bad, cur = (f"member {name} declares {ti.size} bytes, more than the {max_member_bytes} a "
                                    "member may hold (refused from its header, unread)"), {}
                    continue
                if total + ti.size > max_shard_bytes:
                    cur_bad = f"the shard's members pass {max_shard_bytes} bytes in all at {name}"
                    finish()
                    cur_key = None
                    skip_rest(tar, f"the shard's members pass {max_shard_bytes} bytes in all")
                    break
                try:
                    f = tar.extractfile(ti)
                    data = f.read() if f else b""
                    if len(data) != ti.size:
                        raise EOFError("member truncated")
                except (tarfile.TarError, OSError, EOFError, MemoryError) as e:
                    cur_bad = f"corrupt tar member {name}: {e.__class__.__name__ if isinstance(e, MemoryError) else e}"
                    finish()
                    cur_key = None
                    report(url, f"the shard cannot be read past {name}; any samples after it are lost", None)
                    break
                total += len(data)
                cur[ext] = data
    except tarfile.ReadError as e:
        failed = f"not a readable tar file: {e}"
    except Exception as e:  # a download or pipe that fails, a decompressor's error: the shard's, not the run's
        failed = f"the shard could not be read: {_first_line(e)}"
    finally:
        try:
            stream.close()
        except Exception as e:  # webdataset's Pipe raises here when its command exited non-zero: the cause
            failed = f"the shard could not be read: {_first_line(e)}"
    if failed:
        report(url, failed, None)
    if cur_key is not None and finish():
        yield cur_key, cur


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0][:300]}" if text else e.__class__.__name__


def reject_record(where: str, reason: str, lost: int | None = 1) -> dict:
    """A rejects.jsonl record for one refusal of iter_shard; `lost` (samples it stands for, None: unknown) is
    kept where it is not one sample, and counted by pipeline.sharded.rejected_count."""
    rec = {"key": where, "reason": reason}
    if lost != 1:
        rec["lost"] = lost
    return rec


def list_shards(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).glob("*.tar") if not p.name.startswith("."))
