"""Where outputs live, and the one way they are written: exactly once, never half.

Two layers:
  * one storage interface (pipeline.storage.base.Storage): read (whole, streamed, a byte range), write an object
    whole, upload a finished local file whole, create-only, compare-and-swap, list (with sizes and ETags, at one level
    or at any depth), info, an input's identity, a local file for libraries, and the checks before any work. The
    local filesystem (pipeline.storage.local) is one implementation, with its fast paths (scandir, seeks); an object
    store (s3://) is another, registered by scheme in `BACKENDS`, without touching the stages. Code outside this
    package asks the interface and never tests which backend it has (tests/test_architecture.py).
  * the commit protocol (pipeline.storage.commit.Unit) written against it: a unit of output (an image shard, a latent
    shard, a checkpoint, an export) is its payload files, each appearing whole under its final name, and then a
    completion record. A unit counts as done only when its record exists, so a run killed at any moment is finished
    by running it again: done units are skipped, the rest redone, nothing doubled.

Folder locks (pipeline.storage.lock.FolderLock; on object storage pipeline.storage.lease.LeasedLock, chosen by
`folder_lock`) use the same interface's create-only write. Code that names, lists and reads files takes
`as_path(p)`: a pathlib.Path locally, an ObjectPath (pathlib's manners, I/O through the backend) for a URL; what
needs a local file takes `local_copy(url)` (pipeline.storage.cache). Every path is a string
or Path as the user gave it; `storage_for(path)` picks the backend by URL scheme and refuses an unknown one in one
line (a URL is never taken for a local folder name). Object-storage settings can be given per URL prefix, as fsspec's
`storage_options` (`set_storage_options`; the stages read $FIRSTSTAGE_STORAGE_OPTIONS, a YAML file of them, as they
start), so one process reads s3:// from one endpoint and writes to another.
"""

from pipeline.storage.base import (BACKENDS, Storage, load_storage_options, reset_storage,  # noqa: F401
                                   set_storage_options, storage_for)
from pipeline.storage.commit import Unit  # noqa: F401
from pipeline.storage.local import (  # noqa: F401
    LocalStorage,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    disk_full_as_oserror,
    no_space_message,
    read_json,
    remove_dead_temporaries,
    regular_file,
    respect_umask,
)
from pipeline.storage.lock import FolderLock  # noqa: F401
from pipeline.storage.lease import LeasedLock, folder_lock  # noqa: F401
from pipeline.storage.paths import ObjectPath, as_path, check_access, remove_tree  # noqa: F401
from pipeline.storage.cache import LogMirror, local_copy  # noqa: F401
