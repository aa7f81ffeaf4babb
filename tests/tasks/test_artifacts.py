"""Artifacts: built offline and reproducibly, size-limited at register, verified and
unpacked once per host by workers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pluginpool.policy.errors import ArtifactError, ArtifactTooLargeError
from pluginpool.pool.artifact_cache import ArtifactCache, artifact_code_paths
from pluginpool.tasks.artifacts import ArtifactStore
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from tests.conftest import make_settings
from tests.fleet_packages import manifest, wheel_of, write_package


def register_source(client: PluginClient, root: Path, plugin_id: str = "art",
                    source: str = "fleetpkg") -> list[object]:
    return list(client.register(manifest(root / "plugins.toml", {plugin_id: {
        "name": "Art", "version": "1.0.0", "entrypoint": "fleetpkg:run", "source": source}})))


def test_register_builds_publishes_and_reregistering_same_code_keeps_the_revision(
        client: PluginClient, tmp_path: Path) -> None:
    """The wheel is reproducible (same code, same sha256), so an unchanged plugin keeps its
    revision; the build never writes into the source tree."""
    write_package(tmp_path, version=1)
    [first] = register_source(client, tmp_path)
    [again] = register_source(client, tmp_path)
    assert first.artifact is not None  # type: ignore[attr-defined]
    assert again.revision == first.revision == 1  # type: ignore[attr-defined]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleetpkg", "plugins.toml"]
    data = client.artifacts.fetch(first.artifact, plugin_id="art")  # type: ignore[attr-defined]
    assert hashlib.sha256(data).hexdigest() == first.artifact.sha256  # type: ignore[attr-defined]


def test_oversized_artifact_is_refused_at_register_and_nothing_registered(
        redis_url: str, tmp_path: Path) -> None:
    settings = make_settings(redis_url, key_prefix="pptest:art-big:", max_artifact_bytes=1024)
    (tmp_path / "big-1.0-py3-none-any.whl").write_bytes(bytes(range(256)) * 8)
    with PluginClient(settings) as client:
        with pytest.raises(ArtifactTooLargeError) as info:
            register_source(client, tmp_path, source="big-1.0-py3-none-any.whl")
        assert info.value.limit_bytes == 1024 and info.value.size_bytes == 2048
        assert client.plugins() == []
        assert client.redis.keys(f"{settings.key_prefix}artifact:*") == []


def test_a_source_that_is_not_code_is_a_build_error(client: PluginClient,
                                                     tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError) as info:
        register_source(client, tmp_path, source="empty")
    assert info.value.reason == "build"
    with pytest.raises(ArtifactError):
        register_source(client, tmp_path, source="missing-dir")
    assert client.plugins() == []


def test_worker_cache_verifies_unpacks_once_and_refuses_tampered_bytes(
        client: PluginClient, settings: Settings, tmp_path: Path) -> None:
    wheel = wheel_of(tmp_path, version=1)
    [spec] = register_source(client, tmp_path, source=str(wheel))
    ref = spec.artifact  # type: ignore[attr-defined]
    store = ArtifactStore.from_settings(settings)
    cache = ArtifactCache(store, tmp_path / "cache")
    [path] = artifact_code_paths(spec, cache)  # type: ignore[arg-type]
    assert (Path(path) / "fleetpkg" / "__init__.py").is_file()
    assert [p.name for p in (tmp_path / "cache" / "artifacts").iterdir()] == [ref.sha256]
    client.redis.set(settings.keys.artifact(ref.sha256), "tampered")
    assert artifact_code_paths(spec, cache) == [path]  # unpacked already: not fetched again
    fresh = ArtifactCache(store, tmp_path / "cache2")
    with pytest.raises(ArtifactError) as info:
        artifact_code_paths(spec, fresh)  # type: ignore[arg-type]
    assert info.value.reason == "hash_mismatch"
    client.redis.delete(settings.keys.artifact(ref.sha256))
    with pytest.raises(ArtifactError) as missing:
        artifact_code_paths(spec, fresh)  # type: ignore[arg-type]
    assert missing.value.reason == "missing"
    assert not (tmp_path / "cache2" / "artifacts" / ref.sha256).exists()


def test_an_artifact_that_unpacks_to_far_more_than_its_size_is_refused(
        settings: Settings, tmp_path: Path) -> None:
    """A zip bomb: 4 MB of zeros compress to a few KB; the declared sizes are checked
    before anything is extracted."""
    import io
    import zipfile

    from pluginpool.tasks.spec import ArtifactRef

    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb-1.0.dist-info/METADATA", "Name: bomb\n")
        archive.writestr("bomb/zeros.bin", bytes(4 * 1024 * 1024))
    store = ArtifactStore.from_settings(settings)
    store.max_bytes = 100_000
    ref: ArtifactRef = store.publish(data.getvalue(), plugin_id="bomb", filename="b.whl")
    with pytest.raises(ArtifactError) as info:
        ArtifactCache(store, tmp_path / "cache").path_for(ref, plugin_id="bomb")
    assert info.value.reason == "invalid"
    assert not list((tmp_path / "cache" / "artifacts").iterdir())


def test_a_cache_directory_others_may_write_to_is_refused(client: PluginClient,
                                                           settings: Settings,
                                                           tmp_path: Path) -> None:
    """Code is imported from the cache: a directory another user could plant files in
    (group- or world-writable) is refused before anything in it is used."""
    ref = client.artifacts.publish(b"PK\x05\x06" + bytes(18), plugin_id="x",
                                   filename="x.whl")  # an empty zip: never unpacked here
    shared = tmp_path / "shared-cache"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(ArtifactError) as info:
        ArtifactCache(ArtifactStore.from_settings(settings), shared).path_for(ref,
                                                                              plugin_id="x")
    assert info.value.reason == "cache"
