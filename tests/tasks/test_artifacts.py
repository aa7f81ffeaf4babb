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


def wheel_bytes(members: dict[str, bytes], *, compression: int = 8) -> bytes:
    import io
    import zipfile

    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", compression=compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return data.getvalue()


def corrupted(data: bytes, member: str) -> bytes:
    """`data` with one byte in the middle of a member's compressed data flipped (its
    directory intact), found from its local header."""
    import io
    import struct
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo(member)
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:
                                                          info.header_offset + 30])
    at = info.header_offset + 30 + name_length + extra_length + info.compress_size // 2
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


@pytest.mark.parametrize("kind", ["corrupt member", "member outside", "bomb", "no dist-info",
                                  "bz2 member"])
def test_a_wheel_a_worker_would_refuse_is_refused_at_register_and_at_unpack(
        settings: Settings, tmp_path: Path, kind: str) -> None:
    """Before, a corrupt member and a `../` member registered (then each job failed as an
    untyped runtime error, `zlib.error`, or the member was silently renamed), and a zip
    bomb registered and failed only at the first job."""
    from pluginpool.tasks.artifacts import check_wheel

    code = b"def run(ctx, payload):\n    return 1\n" * 200
    members = {"pkg-1.0.dist-info/METADATA": b"Name: pkg\n", "pkg/__init__.py": code}
    if kind == "member outside":
        members["../../escape.txt"] = b"x"
    if kind == "bomb":
        members["pkg/zeros.bin"] = bytes(4 * 1024 * 1024)
    if kind == "no dist-info":
        del members["pkg-1.0.dist-info/METADATA"]
    data = wheel_bytes(members, compression=12 if kind == "bz2 member" else 8)
    if kind == "corrupt member":
        data = corrupted(data, "pkg/__init__.py")
    with pytest.raises(ArtifactError) as info:
        check_wheel(data, plugin_id="p", max_bytes=100_000)
    assert info.value.reason == "invalid"
    store = ArtifactStore.from_settings(settings)  # published past the check (an older
    store.max_bytes = 100_000  # producer): the worker refuses it typed, unpacks nothing
    ref = store.publish(data, plugin_id="p", filename="p.whl")
    with pytest.raises(ArtifactError) as info:
        ArtifactCache(store, tmp_path / "cache").path_for(ref, plugin_id="p")
    assert info.value.reason == "invalid"
    assert not list((tmp_path / "cache" / "artifacts").iterdir())


def test_a_wheel_damaged_anywhere_is_refused_typed_or_unpacks_whole(tmp_path: Path) -> None:
    """One byte flipped at every position of a small wheel: check_wheel raises
    ArtifactError `invalid` or passes, and what passes extracts (a review's fuzzing found
    ValueError, RuntimeError, UnicodeDecodeError and decoder errors escaping untyped)."""
    import io
    import zipfile

    from pluginpool.tasks.artifacts import check_wheel

    data = wheel_bytes({"pkg-1.0.dist-info/METADATA": b"Name: pkg\n",
                        "pkg/__init__.py": b"def run(ctx, payload):\n    return 1\n" * 20})
    for at in range(len(data)):
        damaged = data[:at] + bytes([data[at] ^ 0xA5]) + data[at + 1:]
        try:
            check_wheel(damaged, plugin_id="p", max_bytes=100_000)
        except ArtifactError as exc:
            assert exc.reason == "invalid"
            continue
        with zipfile.ZipFile(io.BytesIO(damaged)) as archive:
            archive.extractall(tmp_path / f"at-{at}")
