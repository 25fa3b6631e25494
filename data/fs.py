"""Where a store lives: a local folder, or a prefix in an object store (s3://, gs://).

``store_location("s3://bucket/prefix")`` gives an ``ObjectPath``: a path in an object store
with the few pathlib methods the store uses (``/``, ``name``, ``parent``, ``exists``,
``read_bytes``, ``glob``, ...) and the writes an object store can make atomic, which a folder
makes atomic with a temporary and a rename:

- ``put(data)``: one PUT; readers see the old object or the new one, never a partial one;
- ``create(data)``: a conditional create (``If-None-Match: *``); False if the key exists;
- ``put_if(data, tag)``: a conditional overwrite (``If-Match``, with GCS's generation); False if the object changed.

A local path or ``file://`` URI gives a ``pathlib.Path``. Any other ``scheme://`` is refused,
so that ``--store s3:/typo`` never becomes a folder named ``s3:`` in the working directory.

The object store client is obstore (one Rust client for S3, GCS and Azure, with conditional
puts). Credentials and endpoints come from the standard places only: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``, the AWS config files, and
``GOOGLE_APPLICATION_CREDENTIALS`` for gs://; never from a tmkd flag.
"""
from __future__ import annotations

import fnmatch
import os
import re
import stat
from functools import lru_cache
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from tmkd.data.errors import without_credentials


URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
ALMOST_URI_RE = re.compile(r"^(s3|gs|file|az|abfs|gcs|https?):/*(?!/)", re.IGNORECASE)  # s3:/x, s3:x
OBJECT_SCHEMES = ("s3", "gs")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")  # S3 and GCS bucket names (GCS allows "_")


class LocationError(ValueError):
    """A --store that names no place tmkd can use (an unknown URI scheme, a bucket without a name)."""


class ObjectStoreError(OSError):
    """The object store refused or failed a request (no such bucket, no permission, a network error):
    the user's to fix, printed as one line."""


def is_uri(where: str | os.PathLike) -> bool:
    return isinstance(where, str) and URI_RE.match(where) is not None


def has_credentials(scheme: str, rest: str) -> bool:
    """Whether ``scheme://rest`` carries a user or key (``s3://KEY:SECRET@bucket``). A secret may hold '/', so
    the URI's authority cannot be trusted to end at the first '/': a bucket name holds neither ':' nor '@', so
    either in the first segment is a credential, wherever the secret ends."""
    first = rest.partition("/")[0]
    return "@" in first or (scheme in OBJECT_SCHEMES and ":" in first)


def store_location(where: str | os.PathLike) -> "Path | ObjectPath":
    """A local folder (a path or file:// URI) or an object store prefix (s3://, gs://)."""
    if isinstance(where, ObjectPath):
        return where
    if not isinstance(where, str):
        return Path(where).absolute()
    if not (match := URI_RE.match(where)):
        if ALMOST_URI_RE.match(where):  # a typo of a URI must not become a folder named "s3:"
            raise LocationError(f"{where}: looks like a URI with a slash missing ({where.split(':')[0]}://...); "
                                "for a local folder of that name, write ./" + where)
        return Path(where).absolute()
    scheme, rest = match.group(1).lower(), match.group(2)
    if has_credentials(scheme, rest):  # refused, and never echoed into a message or log
        shown = without_credentials(where) if "@" in rest else f"{scheme}://***"
        raise LocationError(f"{shown}: a ':' or '@' before the first '/' is not a bucket name: "
                            "credentials in a store URI are refused; give them through the environment "
                            "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the cloud's own credential chain), "
                            "and an endpoint (host:port) through AWS_ENDPOINT_URL")
    if scheme == "file":  # file:///abs/path or file://localhost/abs/path, percent-escapes decoded
        host, _, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise LocationError(f"{where}: a file:// URI names a path on this machine (file:///abs/path), "
                                f"not host {host!r}")
        return Path("/" + unquote(path))
    if scheme not in OBJECT_SCHEMES:
        raise LocationError(f"{where}: unsupported URI scheme {scheme!r}; a store is a local path, file://, "
                            f"{', '.join(s + '://' for s in OBJECT_SCHEMES)}")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise LocationError(f"{where}: no bucket name")
    if not BUCKET_RE.match(bucket):
        raise LocationError(f"{where}: {bucket!r} is not a bucket name (3-63 lowercase letters, digits, '.', '-', '_')")
    segments = [s for s in prefix.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise LocationError(f"{where}: '.' and '..' are not allowed in an object store prefix")
    return ObjectPath(f"{scheme}://{bucket}", "/".join(segments))


@lru_cache(maxsize=None)
def _client(bucket_url: str):
    """One obstore client per bucket and process. obstore reads AWS_* (or GOOGLE_*) from the
    environment; an http:// endpoint (a local MinIO or test server) must be allowed explicitly."""
    from obstore.store import from_url

    config = {}
    if bucket_url.startswith("gs://"):
        # a GCS emulator: the Google SDKs' STORAGE_EMULATOR_HOST, unless obstore's own GOOGLE_BASE_URL says otherwise,
        # so that reads (pyarrow, below) and writes never go to two different services
        endpoint = os.environ.get("GOOGLE_BASE_URL") or os.environ.get("STORAGE_EMULATOR_HOST", "")
        if endpoint and not os.environ.get("GOOGLE_BASE_URL"):
            config["base_url"] = endpoint
    else:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    plain_http = endpoint.startswith("http://")
    return from_url(bucket_url, config=config or None, client_options={"allow_http": True} if plain_http else None)


def _request(what: str, path: "ObjectPath", call, *args, **kwargs):
    """One obstore call; its failures other than "not found" become an ObjectStoreError of one line
    (no such bucket, no permission, bad credentials, a network error after obstore's retries)."""
    from obstore.exceptions import AlreadyExistsError, BaseError, PreconditionError

    try:
        return call(*args, **kwargs)
    except (FileNotFoundError, AlreadyExistsError, PreconditionError):
        raise
    except (BaseError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ObjectStoreError(f"{path}: {what} failed: {type(e).__name__}: {first[:300]}") from None


class ObjectPath:
    """A key in an object store, named like a path: ``s3://bucket/prefix/corpus/x/manifest.json``."""

    __slots__ = ("bucket", "key")

    def __init__(self, bucket: str, key: str):
        self.bucket, self.key = bucket, key.strip("/")

    # ---- names ---------------------------------------------------------------------------
    def __truediv__(self, other: str) -> "ObjectPath":
        return ObjectPath(self.bucket, f"{self.key}/{other}" if self.key else str(other))

    def __str__(self) -> str:
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    __repr__ = __str__

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and (self.bucket, self.key) == (other.bucket, other.key)

    def __lt__(self, other: "ObjectPath") -> bool:
        return (self.bucket, self.key) < (other.bucket, other.key)

    def __hash__(self) -> int:
        return hash((self.bucket, self.key))

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def parent(self) -> "ObjectPath":
        parent = str(PurePosixPath(self.key).parent)
        return ObjectPath(self.bucket, "" if parent == "." else parent)

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def parts(self) -> tuple[str, ...]:
        return PurePosixPath(self.key).parts

    def with_name(self, name: str) -> "ObjectPath":
        return self.parent / name

    def relative_to(self, other: "ObjectPath") -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(other.key) if other.key else PurePosixPath(self.key)

    def absolute(self) -> "ObjectPath":
        return self

    # ---- reads ---------------------------------------------------------------------------
    @property
    def client(self):
        return _client(self.bucket)

    def head(self) -> dict | None:
        """size, last_modified, e_tag; None if there is no such object."""
        import obstore

        try:
            return _request("HEAD", self, obstore.head, self.client, self.key)
        except FileNotFoundError:
            return None

    def exists(self) -> bool:
        return self.head() is not None or self.is_dir()

    def is_file(self) -> bool:
        return self.head() is not None

    def is_dir(self) -> bool:
        import obstore

        listing = _request("LIST", self, obstore.list_with_delimiter, self.client,
                           prefix=self.key + "/" if self.key else None)
        return bool(listing["objects"] or listing["common_prefixes"])

    def read_bytes(self) -> bytes:
        import obstore

        return bytes(_request("GET", self, lambda: obstore.get(self.client, self.key).bytes()))

    def read_tagged(self) -> tuple[bytes, dict]:
        """The object's bytes and the tag of that very version (for a later ``put_if``)."""
        import obstore

        def get():
            result = obstore.get(self.client, self.key)
            return bytes(result.bytes()), version_tag(result.meta)

        return _request("GET", self, get)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def walk_keys(self) -> list[str]:
        """The key of every object under this prefix, as listed (folder markers, keys ending in "/" that
        consoles create, are not objects of a store and are left out). Listed with pyarrow's filesystem:
        obstore refuses to list a key with an empty segment (a//b), and one such key would hide the rest."""
        import pyarrow.fs as pafs

        base = self.arrow_path()
        try:
            infos = _arrow_filesystem(self.bucket).get_file_info(
                pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as e:
            raise ObjectStoreError(f"{self}: LIST failed: {str(e).strip().splitlines()[0][:300]}") from None
        skip = len(self.bucket.split("://", 1)[1]) + 1
        return [i.path[skip:] for i in infos if i.type == pafs.FileType.File and not i.path.endswith("/")]

    def walk_files(self) -> list["ObjectPath"]:
        """Every object under this prefix whose key is a path (no empty segment: `a//b` cannot be a part
        of a store, and obstore refuses requests on such keys; verify names them from ``walk_keys``)."""
        return [ObjectPath(self.bucket, k) for k in self.walk_keys() if "" not in k.split("/")]

    def glob(self, pattern: str) -> list["ObjectPath"]:
        """Objects whose key below this prefix matches ``pattern`` segment by segment (``*`` stays
        within a segment, as in pathlib)."""
        want = pattern.split("/")
        out = []
        for f in self.walk_files():
            rel = f.relative_to(self).parts
            if len(rel) == len(want) and all(fnmatch.fnmatchcase(r, w) for r, w in zip(rel, want)):
                out.append(f)
        return sorted(out)

    # ---- writes --------------------------------------------------------------------------
    def mkdir(self, *args, **kwargs) -> None:
        """Object stores have no folders: nothing to make."""

    def rmdir(self) -> None:
        """Nothing to remove: a prefix without objects does not exist."""

    def put(self, data: bytes) -> dict:
        import obstore

        return _request("PUT", self, obstore.put, self.client, self.key, data)

    def create(self, data: bytes) -> bool:
        """Write only if no object has this key (If-None-Match: *). True if we created it."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            _request("PUT (create)", self, obstore.put, self.client, self.key, data, mode="create")
            return True
        except (AlreadyExistsError, PreconditionError):
            return False

    def put_if(self, data: bytes, tag: dict) -> bool:
        """Overwrite only if the object is still the version ``tag`` names (``version_tag`` of a head or a
        ``read_tagged``): If-Match on S3, if-generation-match on GCS. True if we did."""
        import obstore
        from obstore.exceptions import PreconditionError

        try:
            _request("PUT (if match)", self, obstore.put, self.client, self.key, data, mode=version_tag(tag))
            return True
        except (PreconditionError, FileNotFoundError):
            return False

    def unlink(self, missing_ok: bool = False) -> None:
        import obstore

        if not missing_ok and self.head() is None:
            raise FileNotFoundError(str(self))
        _request("DELETE", self, obstore.delete, self.client, self.key)

    # ---- for pyarrow ---------------------------------------------------------------------
    def arrow_filesystem(self):
        """A pyarrow filesystem for this bucket (from_uri honours AWS_ENDPOINT_URL)."""
        return _arrow_filesystem(self.bucket)

    def arrow_path(self) -> str:
        """This key as pyarrow's filesystem names it: bucket/key."""
        bucket = self.bucket.split("://", 1)[1]
        return f"{bucket}/{self.key}" if self.key else bucket


def read_record_text(path: "Path | ObjectPath") -> str:
    """The text of a small record file (store.json, a manifest, a commit record). A FIFO, a device or a folder
    in its place is an OSError at once: opened without blocking and checked before a byte is read, so that no
    reader can hang on it or read /dev/zero without end."""
    if isinstance(path, ObjectPath):
        return path.read_text()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path}: not a regular file (a FIFO, a device or a folder in its place)")
    with os.fdopen(fd, "rb") as f:
        return f.read().decode()


def output_file(path: Path) -> Path:
    """Where a write-then-rename of the output ``path`` must go: through a symlink to the file it names (the
    link itself is kept), and never onto a pipe, a device or a folder, which a rename would replace."""
    if path.exists() and not path.is_file():
        raise OSError(f"{path}: not a regular file (a pipe, a device or a folder); outputs are written to a "
                      "file and renamed into place")
    target = path.resolve()
    if not target.parent.is_dir():  # a dangling symlink into a folder that does not exist: not created for it
        raise OSError(f"{path}: the folder {target.parent} does not exist")
    return target


def inside_store(path: "Path | str", root: "Path | ObjectPath") -> bool:
    """Whether writing to the local ``path`` would write into the store at ``root``, through symlinks too: no job
    writes its outputs into a store (a stray file there is a damaged store to every reader)."""
    if isinstance(root, ObjectPath) or is_uri(path):
        return False
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def version_tag(meta: dict) -> dict:
    """What a conditional overwrite needs to name one version of an object: its e_tag, and on stores that
    number versions (GCS's generation) the version too; obstore refuses a version of None."""
    tag = {"e_tag": meta["e_tag"]}
    if meta.get("version") is not None:
        tag["version"] = meta["version"]
    return tag


@lru_cache(maxsize=None)
def _arrow_filesystem(bucket_url: str):
    import pyarrow.fs as pafs

    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    try:
        if bucket_url.startswith("gs://") and emulator:  # a local GCS API (the Google SDKs' variable)
            scheme, _, host = emulator.rpartition("://")
            fs = pafs.GcsFileSystem(anonymous=True, scheme=scheme or "http", endpoint_override=host.rstrip("/"))
        else:
            fs, _ = pafs.FileSystem.from_uri(bucket_url)
    except (OSError, ValueError) as e:
        raise ObjectStoreError(f"{bucket_url}: {str(e).strip().splitlines()[0][:300]}") from None
    return fs
