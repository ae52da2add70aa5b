"""The run root's filesystem as Ray's processes get it, and, where the recipe asks, the driver's object-store
credentials relayed to them and renewed before they expire.

`storage.credentials: node` (the default): the filesystem object travels without credentials, so each node
signs with its own provider chain (instance role, Kubernetes service account, AWS_* in its environment).

`storage.credentials: driver`, for nodes that have none: the driver reads its credentials with botocore's
provider chain (environment, shared config and profiles with SSO, `credential_process` or an assumed role, web
identity, container and instance metadata), which renews temporary credentials before they expire (from 15
minutes before). A thread of the driver asks the chain every `publish_every_s` and hands each new set to a small
Ray actor through the object store (never a runtime environment or a task argument that Ray logs or shows).
The filesystem the processes get is a `PyFileSystem` over an S3 filesystem that it rebuilds whenever that actor
holds a newer set, checked at most every `check_every_s` when it is used; it pickles without credentials.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from sphuatuo.local_models import build_cached, default_cache_dir
from sphuatuo.store.run_root import RunRoot

log = logging.getLogger("sphuatuo")

PUBLISH_EVERY_S = 60.0
CHECK_EVERY_S = 60.0
"""A renewed set reaches every process within two minutes, well inside the ten the chain renews ahead."""


@contextmanager
def shared_filesystem(run: RunRoot, credentials: str = "node", *, publish_every_s: float | None = None,
                      check_every_s: float | None = None) -> Iterator[pafs.FileSystem]:
    """The run's filesystem for Ray's controller and workers (pickled, with its options) while the block runs:
    the run's own with `credentials: node`, or for a local or NFS run root; the driver's credentials relayed
    and renewed with `credentials: driver` on an object store (intervals: PUBLISH_EVERY_S, CHECK_EVERY_S)."""
    publish_every_s = PUBLISH_EVERY_S if publish_every_s is None else publish_every_s
    check_every_s = CHECK_EVERY_S if check_every_s is None else check_every_s
    if credentials != "driver" or not isinstance(run.fs, pafs.S3FileSystem):
        yield run.fs
        return
    import botocore.session

    session = botocore.session.Session()
    first = _read(session)
    if first is None:
        log.warning("storage.credentials is driver, but this driver has no AWS credentials: each node signs "
                    "with its own provider chain")
        yield run.fs
        return
    with _relay(first, session, publish_every_s) as (name, namespace):
        _, (options,) = run.fs.__reduce__()
        yield pafs.PyFileSystem(RelayedS3Handler(options, name, namespace, check_every_s))


def _read(session: Any) -> dict[str, str] | None:
    """The driver's current credentials, renewed by botocore when they are about to expire."""
    found = session.get_credentials()
    if found is None:
        return None
    frozen = found.get_frozen_credentials()
    return {"access_key": frozen.access_key, "secret_key": frozen.secret_key, "session_token": frozen.token or ""}


class CredentialRelay:
    """A Ray actor holding the newest credentials the driver published, numbered."""

    def __init__(self) -> None:
        self.version = 0
        self.credentials: dict[str, str] | None = None

    def publish(self, credentials: dict[str, str]) -> int:
        self.version += 1
        self.credentials = credentials
        return self.version

    def newer(self, version: int) -> tuple[int, dict[str, str]] | None:
        """The newest set with its number, or None when the asker holds it already."""
        return None if version == self.version else (self.version, self.credentials)


@contextmanager
def _relay(first: dict[str, str], session: Any, publish_every_s: float) -> Iterator[tuple[str, str]]:
    """A relay actor holding `first`, and a driver thread publishing every renewed set to it: yields the actor's
    name and namespace. The values go through the object store (`ray.put`), so a task's arguments hold only
    a reference."""
    import ray

    name = f"sphuatuo-credentials-{uuid.uuid4().hex[:12]}"
    relay = ray.remote(num_cpus=0)(CredentialRelay).options(name=name).remote()

    def publish(credentials: dict[str, str]) -> None:
        ray.get(relay.publish.remote(ray.put(credentials)))

    publish(first)
    stop = threading.Event()

    def renew() -> None:
        last = first
        while not stop.wait(publish_every_s):
            try:
                current = _read(session)
                if current is not None and current != last:
                    publish(current)
                    last = current
                    log.info("object-store credentials renewed for the run's Ray processes")
            except Exception as err:  # noqa: BLE001 - the old set stays valid until it expires; try again
                log.warning("renewing the driver's object-store credentials failed (%s: %s); trying again in %.0fs",
                            type(err).__name__, err, publish_every_s)

    thread = threading.Thread(target=renew, name="sphuatuo-credentials", daemon=True)
    thread.start()
    try:
        yield name, ray.get_runtime_context().namespace
    finally:
        stop.set()
        thread.join()
        ray.kill(relay)


class RelayedS3Handler(pafs.FileSystemHandler):
    """An S3 filesystem signing with the credentials the relay holds: asks it for a newer set when used, at most
    every `check_every_s`, and rebuilds the S3 filesystem with that set. Pickles as its options and the relay's
    name only, so no credentials travel with it."""

    def __init__(self, options: dict[str, Any], relay: str, namespace: str, check_every_s: float = CHECK_EVERY_S):
        # No background writes: a PyFileSystem is not recognised as S3 by Ray Train's uploads, which then copy with
        # threads; background writes would wait on the same I/O pool (apache/arrow#32372).
        self.options = {**options, "access_key": None, "secret_key": None, "session_token": None,
                        "background_writes": False}
        self.relay = relay
        self.namespace = namespace
        self.check_every_s = check_every_s
        self._forget()

    def _forget(self) -> None:
        self._s3: pafs.S3FileSystem | None = None
        self._version = 0
        self._next_check = 0.0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options, "relay": self.relay, "namespace": self.namespace,
                "check_every_s": self.check_every_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._forget()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RelayedS3Handler) and self.__getstate__() == other.__getstate__()

    def __hash__(self) -> int:
        return hash(self.relay)

    @property
    def version(self) -> int:
        """The number of the credential set in use (0: none fetched yet)."""
        return self._version

    def s3(self) -> pafs.S3FileSystem:
        """The S3 filesystem with the newest credentials the relay holds."""
        import ray

        with self._lock:
            now = time.monotonic()
            if self._s3 is not None and now < self._next_check:
                return self._s3
            self._next_check = now + self.check_every_s
            try:
                relay = ray.get_actor(self.relay, namespace=self.namespace)
                newer = ray.get(relay.newer.remote(self._version))
            except Exception as err:  # noqa: BLE001
                if self._s3 is None:
                    raise RuntimeError(f"no object-store credentials: the driver's relay {self.relay} cannot be "
                                       f"reached ({type(err).__name__})") from None
                log.warning("the driver's credential relay cannot be reached (%s); signing with the last set",
                            type(err).__name__)
                return self._s3
            if newer is not None:
                self._version, credentials = newer
                self._s3 = pafs.S3FileSystem(**{**self.options, **credentials})
            return self._s3

    def get_type_name(self) -> str:
        return "sphuatuo-relayed-s3"

    def normalize_path(self, path: str) -> str:
        return self.s3().normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.s3().get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.s3().get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.s3().create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.s3().delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.s3().delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.s3().delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self.s3().delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.s3().move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.s3().copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        return self.s3().open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self.s3().open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        return self.s3().open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        return self.s3().open_append_stream(path, metadata=metadata)


def engine_model_path(run: RunRoot, location: str, credentials: str = "node") -> str:
    """Where an engine loads a model the run wrote at `location`: there itself, except with `credentials: driver`
    on an object store. vLLM fetches an `s3://` model with each node's own provider chain, which such nodes lack;
    there every node gets a copy in its model cache through the relayed filesystem, at the same path on each
    node, named by the model's files (their sizes and times), so a model written again is fetched again.
    Nodes that join later have no copy: give autoscaling clusters node credentials."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # The run root's URI, not its filesystem's type: the pipeline's stages see S3 through the relayed filesystem.
    if credentials != "driver" or not run.uri.startswith("s3://") or "://" not in location:
        return location
    source = location.split("://", 1)[1]
    files = run.fs.get_file_info(pafs.FileSelector(source, recursive=True))
    identity = json.dumps(sorted((f.path, f.size, str(f.mtime)) for f in files))
    target = default_cache_dir() / "run-models" / hashlib.sha256(identity.encode()).hexdigest()[:16]
    with shared_filesystem(run, credentials) as filesystem:
        copy = ray.remote(num_cpus=0)(_copy_to_node)
        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        ray.get([copy.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            filesystem, source, target) for node in nodes])
    log.info("model %s copied to %s on %d node(s) (storage.credentials: driver)", location, target, len(nodes))
    return str(target)


def _copy_to_node(filesystem: pafs.FileSystem, source: str, target: Path) -> None:
    """Copy `source` to this node's `target` unless a complete copy is there; a copy appears whole or not at all."""
    build_cached(target, lambda out: pafs.copy_files(source, str(out), source_filesystem=filesystem,
                                                     destination_filesystem=pafs.LocalFileSystem()))
