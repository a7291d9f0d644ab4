"""Uploaded bundles: safe extraction, OPA-format signatures, manifest revisions, compilation and
the bundle's own tests (services/policy_admission/artifacts.py, tenant_bundles.check_archive)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from libs import policy_bundles as artifacts
from libs.policy_bundles import BundleRejected, BundleTooLarge, reason_of
from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR
from services.policy_admission.tenant_bundles import (
    Keys,
    SigningKey,
    check_archive,
    check_signer,
)
from tests.integration.helpers.policy_bundles import (
    KEY_ID,
    dropping,
    new_key,
    replacing,
    repo_files,
    signed,
)

KEY = new_key()
PEM = artifacts.public_pem(KEY)
KEYS = {KEY_ID: PEM}


def _tar(add: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        add(tar)
    return buf.getvalue()


def _member(
    name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE
) -> Callable[[tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.REGTYPE:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        else:
            info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info)

    return add


# --- extraction ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("archive", "reason"),
    [
        (_tar(_member("/etc/cron.d/x")), "bundle_unsafe_path"),
        (_tar(_member("../outside.rego")), "bundle_unsafe_path"),
        (_tar(_member("policies/../../outside.rego")), "bundle_unsafe_path"),
        (_tar(_member("link.rego", kind=tarfile.SYMTYPE)), "bundle_link"),
        (_tar(_member("hard.rego", kind=tarfile.LNKTYPE)), "bundle_link"),
        (_tar(_member("dev", kind=tarfile.CHRTYPE)), "bundle_special_file"),
        (_tar(_member("blk", kind=tarfile.BLKTYPE)), "bundle_special_file"),
        (_tar(_member("fifo", kind=tarfile.FIFOTYPE)), "bundle_special_file"),
        (b"PK\x03\x04 a zip file", "bundle_malformed"),
        (b"\x1f\x8b\x08\x00 truncated gzip", "bundle_malformed"),
    ],
)
def test_unsafe_or_malformed_archives_are_refused_by_name(archive: bytes, reason: str) -> None:
    with pytest.raises(BundleRejected) as caught:
        artifacts.extract(archive)
    assert caught.value.reason == reason
    assert str(caught.value).startswith(f"{reason}: ")


def test_duplicate_paths_are_refused() -> None:
    def add(tar: tarfile.TarFile) -> None:
        _member("a.rego", b"1")(tar)
        _member("./a.rego", b"2")(tar)

    with pytest.raises(BundleRejected, match=r"^bundle_duplicate_file"):
        artifacts.extract(_tar(add))


def test_too_many_files_are_refused() -> None:
    def add(tar: tarfile.TarFile) -> None:
        for i in range(artifacts.MAX_FILES + 1):
            _member(f"f{i}.json", b"{}")(tar)

    with pytest.raises(BundleRejected, match=r"^bundle_too_many_files"):
        artifacts.extract(_tar(add))


def test_a_file_over_its_bound_is_413_before_it_is_read() -> None:
    # Zeros compress to almost nothing: the archive is small, the file is not.
    archive = _tar(_member("big.json", b"0" * (artifacts.MAX_FILE_BYTES + 1)))
    assert len(archive) < artifacts.MAX_ARCHIVE_BYTES
    with pytest.raises(BundleTooLarge, match=r"^bundle_file_too_large") as caught:
        artifacts.extract(archive)
    assert caught.value.http_status == 413


def test_files_adding_up_past_the_total_bound_are_refused() -> None:
    def add(tar: tarfile.TarFile) -> None:
        for i in range(artifacts.MAX_TOTAL_BYTES // artifacts.MAX_FILE_BYTES + 1):
            _member(f"f{i}.bin", b"0" * artifacts.MAX_FILE_BYTES)(tar)

    with pytest.raises(BundleTooLarge, match=r"^bundle_file_too_large"):
        artifacts.extract(_tar(add))


def test_a_header_that_expands_without_bound_is_stopped_while_decompressing() -> None:
    # A GNU long-name header of 64 MiB: tarfile would read it whole into memory.
    def add(tar: tarfile.TarFile) -> None:
        _member("n" * (64 * 1024 * 1024), b"x")(tar)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        add(tar)
    archive = buf.getvalue()
    assert len(archive) < artifacts.MAX_ARCHIVE_BYTES
    with pytest.raises(BundleTooLarge, match=r"^bundle_file_too_large: the archive expands"):
        artifacts.extract(archive)


def test_an_archive_over_its_bound_is_413() -> None:
    with pytest.raises(BundleTooLarge, match=r"^bundle_too_large"):
        artifacts.extract(b"\x1f\x8b" + b"0" * artifacts.MAX_ARCHIVE_BYTES)


def test_pack_is_deterministic_and_round_trips() -> None:
    files = {"b.rego": b"package b", "a/data.json": b"{}"}
    assert artifacts.pack(files) == artifacts.pack(dict(reversed(list(files.items()))))
    assert artifacts.extract(artifacts.pack(files)) == files


# --- signatures ----------------------------------------------------------------------------------


def _verify(archive: bytes, keys: dict[str, str] = KEYS) -> artifacts.SignedBy:
    return artifacts.verify(artifacts.extract(archive), keys)


def test_a_bundle_signed_by_a_registered_key_verifies() -> None:
    signed_by = _verify(signed(KEY))
    assert signed_by.key_id == KEY_ID
    assert ".manifest" in signed_by.files and "data.json" in signed_by.files


def test_a_bundle_signed_the_way_opa_build_signs_it_verifies() -> None:
    """The JWT made by another JWS implementation, exactly in OPA's format: header ``kid``,
    payload ``files`` with Go's struct field order and the deprecated ``keyid`` claim; JSON files
    hashed over their sorted, compact form (whitespace and key order do not count)."""
    files = {
        ".manifest": b'{ "roots": [""],\n  "revision": "7" }',
        "data.json": b'{ "b": [1, 2.50], "a": "x" }',
        "policy.rego": b"package p\n\nimport rego.v1\n\nallow := true\n",
    }
    expected = {
        # computed by hand from OPA's bundle/hash.go rules
        ".manifest": hashlib.sha256(b'{"revision":"7","roots":[""]}').hexdigest(),
        "data.json": hashlib.sha256(b'{"a":"x","b":[1,2.50]}').hexdigest(),
        "policy.rego": hashlib.sha256(files["policy.rego"]).hexdigest(),
    }
    for name, data in files.items():
        assert artifacts.file_hash(name, data) == expected[name]
    payload = {
        "files": [{"name": n, "hash": expected[n], "algorithm": "SHA-256"} for n in sorted(files)],
        "keyid": "opa-key",
    }
    token = jwt.encode(payload, KEY, algorithm="EdDSA", headers={"kid": "opa-key"})
    archive = artifacts.pack(
        {**files, ".signatures.json": json.dumps({"signatures": [token]}).encode()}
    )
    assert _verify(archive, {"opa-key": PEM}).key_id == "opa-key"


def test_our_signature_verifies_with_an_independent_jwt_library() -> None:
    doc = json.loads(artifacts.sign_files({"a.rego": b"package a"}, KEY, KEY_ID))
    (token,) = doc["signatures"]
    claims = jwt.decode(token, KEY.public_key(), algorithms=["EdDSA"])
    assert jwt.get_unverified_header(token)["kid"] == KEY_ID
    assert claims["files"] == [
        {
            "algorithm": "SHA-256",
            "hash": hashlib.sha256(b"package a").hexdigest(),
            "name": "a.rego",
        }
    ]


@pytest.mark.parametrize(
    ("archive", "reason"),
    [
        (signed(KEY, after_signing=dropping(".signatures.json")), "bundle_unsigned"),
        (
            signed(KEY, after_signing=replacing(".signatures.json", b'{"signatures": []}')),
            "bundle_unsigned",
        ),
        (
            signed(KEY, after_signing=replacing("policies/token_limit.rego", b"package x\n")),
            "bundle_file_tampered",
        ),
        (
            signed(KEY, after_signing=replacing("data.json", b'{"missioncontrol": {}}')),
            "bundle_file_tampered",
        ),
        (
            signed(KEY, after_signing=replacing("policies/extra.rego", b"package e")),
            "bundle_file_unsigned",
        ),
        (signed(KEY, after_signing=dropping("policies/cost_cap.rego")), "bundle_file_missing"),
        (signed(KEY, key_id="someone-else"), "bundle_key_unknown"),
        (signed(new_key()), "bundle_signature_invalid"),
    ],
    ids=[
        "unsigned",
        "no-jwt",
        "tampered-rego",
        "tampered-data",
        "extra-file",
        "missing-file",
        "unknown-key",
        "wrong-key-same-id",
    ],
)
def test_bad_bundles_are_refused_by_name(archive: bytes, reason: str) -> None:
    with pytest.raises(BundleRejected) as caught:
        _verify(archive)
    assert reason_of(caught.value) == reason


def test_a_forged_payload_under_a_valid_header_is_refused() -> None:
    files = repo_files()
    doc = json.loads(artifacts.sign_files(files, KEY, KEY_ID))
    header, payload, sig = doc["signatures"][0].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["files"] = claims["files"][:1]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    files[".signatures.json"] = json.dumps({"signatures": [f"{header}.{forged}.{sig}"]}).encode()
    with pytest.raises(BundleRejected, match=r"^bundle_signature_invalid"):
        _verify(artifacts.pack(files))


def test_other_algorithms_are_refused() -> None:
    files = {"a.rego": b"package a"}
    token = jwt.encode(
        {
            "files": [
                {
                    "name": "a.rego",
                    "hash": artifacts.file_hash("a.rego", files["a.rego"]),
                    "algorithm": "SHA-256",
                }
            ]
        },
        "secret-of-at-least-32-bytes-for-hmac!!",
        algorithm="HS256",
        headers={"kid": KEY_ID},
    )
    files[".signatures.json"] = json.dumps({"signatures": [token]}).encode()
    with pytest.raises(BundleRejected, match=r"^bundle_signature_invalid"):
        _verify(artifacts.pack(files))


def test_a_retired_key_is_named_as_retired() -> None:
    keys = Keys((SigningKey(KEY_ID, PEM, artifacts.key_fingerprint(PEM), retired=True),))
    with pytest.raises(BundleRejected, match=r"^bundle_key_retired"):
        check_signer(keys, KEY_ID)
    with pytest.raises(BundleRejected, match=r"^bundle_key_unknown"):
        check_signer(keys, "never-registered")
    assert keys.active() == {}


# --- manifest, compilation, tests ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("lower", "higher"),
    [("1", "2"), ("9", "10"), ("1.9", "1.10"), ("1", "1.0"), ("2026.11.30.1", "2026.12.1")],
)
def test_revisions_order_as_integers_component_by_component(lower: str, higher: str) -> None:
    assert artifacts.revision_key(lower) < artifacts.revision_key(higher)


@pytest.mark.parametrize("revision", [None, "", "v1", "1..2", "-1", 7])
def test_a_manifest_without_an_ordered_revision_is_refused(revision: object) -> None:
    manifest = {} if revision is None else {"revision": revision}
    with pytest.raises(BundleRejected, match=r"^bundle_manifest_invalid"):
        artifacts.manifest_revision({".manifest": json.dumps(manifest).encode()})


def test_the_repository_bundle_passes_every_check() -> None:
    archive = signed(KEY, repo_files(revision="3"))
    checked = check_archive(archive, KEYS)
    assert checked.digest == artifacts.archive_digest(archive)
    assert checked.bundle.digest == checked.digest
    assert checked.revision == "3"
    assert "token_limit" in [p.policy_id for p in checked.bundle.policies]
    assert (
        checked.bundle.data["missioncontrol"]["config"]["defaults"]["max_tokens_per_run"] == 10000
    )


def test_a_bundle_that_does_not_compile_is_refused() -> None:
    files = repo_files()
    files["policies/broken.rego"] = b"package missioncontrol.policies.broken\n\ndeny contains if {"
    with pytest.raises(BundleRejected, match=r"^bundle_compile_failed"):
        check_archive(signed(KEY, files), KEYS)


def test_a_bundle_whose_own_tests_fail_is_refused() -> None:
    files = repo_files(max_tokens=5)  # the token_limit tests expect the 10000 default
    with pytest.raises(BundleRejected, match=r"^bundle_tests_failed") as caught:
        check_archive(signed(KEY, files), KEYS)
    assert "bundle tests failed: missioncontrol.tests." in str(caught.value)


def test_data_files_are_placed_by_their_directory() -> None:
    files = repo_files()
    files["extra/limits/data.json"] = b'{"x": 1}'
    checked = check_archive(signed(KEY, files), KEYS)
    assert checked.bundle.data["extra"]["limits"] == {"x": 1}


def test_sign_directory_writes_a_bundle_that_passes_every_check(tmp_path: Path) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    out = tmp_path / "b.tar.gz"
    digest = artifacts.sign_directory(
        DEFAULT_BUNDLE_DIR, key_file.read_bytes(), KEY_ID, out, revision="5"
    )
    assert digest == artifacts.archive_digest(out.read_bytes())
    checked = check_archive(out.read_bytes(), KEYS)
    assert (checked.revision, checked.signer_key_id) == ("5", KEY_ID)
    # The same directory and key make the same bytes.
    again = tmp_path / "again.tar.gz"
    assert (
        artifacts.sign_directory(
            DEFAULT_BUNDLE_DIR, key_file.read_bytes(), KEY_ID, again, revision="5"
        )
        == digest
    )


def test_sign_directory_refuses_links(tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "escape.rego").symlink_to("/etc/hostname")
    with pytest.raises(BundleRejected, match=r"^bundle_link"):
        artifacts.directory_files(tmp_path / "bundle", revision="1")
