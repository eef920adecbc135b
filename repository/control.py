"""MODEL_CONTROL: how the models served follow the repository once the server runs.

``poll`` reads the repository every MODEL_POLL_S and serves what changed: a new version
folder, a changed file, a version the policy no longer serves. ``explicit`` does the same
for one model when asked (``POST /v2/repository/models/{name}/load``), and unloads one
(``/unload``). ``none`` serves what was there at startup.

A swap loses nothing: the new version loads and warms up beside the old one, takes the
traffic at once when ready, and the old one answers what it holds before it stops. A
version that fails to load leaves what was served in place, with the reason in the log
and the repository index; it is tried again when its files change.
"""

import asyncio
import hashlib
import logging
from pathlib import Path

from repository.layout import ModelEntry, ModelLoadError, model_folders, read_entry, scan
from repository.model import RepositoryModel
from serving import Engine
from serving.errors import ModelNotFound

logger = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(entry: ModelEntry, version: int) -> Fingerprint:
    """What a version's files are now: the model file, the config and the labels, by
    modification time and size."""
    paths = [entry.versions[version], entry.config_path]
    paths += [entry.folder / o.label_filename for o in entry.config.output if o.label_filename]
    stamps: list[tuple[str, int, int]] = []
    if entry.config_text is not None:  # a load request's config: a change of it reloads
        digest = hashlib.sha256(entry.config_text.encode()).digest()
        stamps.append(("config", int.from_bytes(digest[:8], "big"), len(entry.config_text)))
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        stamps.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


class RepositoryControl:
    """Keeps the engine's repository models in step with MODEL_REPOSITORY."""

    def __init__(
        self, engine: Engine, root: Path, reserved: frozenset[str], models: list[RepositoryModel]
    ) -> None:
        self.engine = engine
        self.root = root
        self.reserved = reserved
        # What each version served (or tried) was loaded from.
        self.loaded: dict[tuple[str, str], Fingerprint] = {
            (m.name, m.version): fingerprint(m.entry, m.version_number) for m in models
        }
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None

    def start_polling(self, interval_s: float) -> None:
        self._poller = asyncio.create_task(self._poll(interval_s), name="repository-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.wait([self._poller])

    async def _poll(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync()
            except Exception:  # the next round tries again; serving goes on
                logger.exception("reading MODEL_REPOSITORY=%s failed", self.root)

    async def sync(self) -> None:
        """Serves what the whole repository holds now."""
        async with self._lock:
            found = await asyncio.to_thread(scan, self.root, self.reserved)
            for name, reason in found.failed.items():
                self._set_aside(name, reason)
            entries = {entry.name: entry for entry in found.models}
            for entry in entries.values():
                await self._follow(entry)
            for name in {name for name, _ in self.loaded} - set(entries) - set(found.failed):
                await self._unload(name)  # its folder is gone

    async def load(self, name: str, config_text: str | None = None) -> None:
        """Serves model ``name`` as its folder holds it now (explicit control), with
        ``config_text`` (JSON, Triton's load parameter ``config``) in place of its
        config.pbtxt if given. Raises ModelNotFound if there is no such folder,
        ModelLoadError if it cannot be served."""
        folder = self.root / name
        if name in self.reserved or not (folder.is_dir() and folder.parent == self.root):
            raise ModelNotFound(f"MODEL_REPOSITORY has no model {name!r}")
        async with self._lock:
            try:
                entry = await asyncio.to_thread(read_entry, folder, config_text)
            except ModelLoadError as exc:
                self._set_aside(name, str(exc))
                raise
            failures = await self._follow(entry)
            if failures:
                raise ModelLoadError("; ".join(failures))

    async def unload(self, name: str) -> None:
        """Stops serving every version of model ``name`` (explicit control)."""
        async with self._lock:
            if name not in self.engine.versions and not any(n == name for n, _ in self.loaded):
                raise ModelNotFound(f"model {name!r} is not loaded")
            await self._unload(name)

    def not_loaded(self) -> dict[str, str]:
        """The model folders of the repository that serve nothing and were not set aside
        (new since startup or the last poll, or unloaded), each with what loads it."""
        try:
            names = [p.name for p in model_folders(self.root) if p.name not in self.reserved]
        except OSError:  # the folder is gone or unreadable: the next poll says so
            return {}
        how = {
            "explicit": "POST /v2/repository/models/{}/load loads it",
            "poll": "the next read of the repository loads it (MODEL_CONTROL=poll)",
        }.get(self.engine.settings.model_control, "MODEL_CONTROL=none loads models at startup")
        return {
            name: f"not loaded: {how.format(name)}"
            for name in names
            if name not in self.engine.versions and name not in self.engine.failed
        }

    def _set_aside(self, name: str, reason: str) -> None:
        """A model whose folder cannot be read now: what it served goes on."""
        failed = self.engine.failed.setdefault(name, {})
        if failed.get("") != reason:
            logger.error("model %s of MODEL_REPOSITORY cannot be read: %s", name, reason)
        failed[""] = reason

    async def _follow(self, entry: ModelEntry) -> list[str]:
        """Loads what changed of ``entry``'s versions, then unloads those it no longer
        serves, once every version it serves is loaded: the traffic has moved by then,
        and a version that fails to load leaves the one it would replace serving.
        Returns why each version that failed to load did."""
        failures = []
        self.engine.failed.get(entry.name, {}).pop("", None)
        wanted = {str(v): fingerprint(entry, v) for v in entry.versions}
        for version, stamp in wanted.items():
            key = (entry.name, version)
            if self.loaded.get(key) == stamp:
                continue
            self.loaded[key] = stamp  # tried once per change of its files
            model = RepositoryModel.for_version(entry, int(version))
            if not await self.engine.add_model(model):
                failures.append(self.engine.failed[entry.name][version])
        served = self.engine.versions.get(entry.name, {})
        if any(version not in served for version in wanted):
            return failures  # the versions they would replace go on serving
        for name, version in [k for k in self.loaded if k[0] == entry.name]:
            if version not in wanted:
                del self.loaded[(name, version)]
                self.engine.failed.get(name, {}).pop(version, None)
                await self.engine.remove_model(name, version)
        return failures

    async def _unload(self, name: str) -> None:
        for key in [k for k in self.loaded if k[0] == name]:
            del self.loaded[key]
        self.engine.failed.pop(name, None)
        for version in list(self.engine.versions.get(name, {})):
            await self.engine.remove_model(name, version)
