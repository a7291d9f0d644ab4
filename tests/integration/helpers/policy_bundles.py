"""Signed policy bundles for tests: the repository's bundle, packed as an upload, signed or not,
with one change or another."""

from __future__ import annotations

import json
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from libs import policy_bundles as artifacts
from services.policy_admission.bundle import DEFAULT_BUNDLE_DIR

KEY_ID = "release-2026"


def repo_files(revision: str = "1", max_tokens: int | None = None) -> dict[str, bytes]:
    """The repository's bundle as archive files, with a ``.manifest`` at ``revision``; with
    ``max_tokens`` the default token limit is changed (so the digest and decisions differ)."""
    files = artifacts.directory_files(DEFAULT_BUNDLE_DIR, revision=revision)
    if max_tokens is not None:
        data = json.loads(files["data.json"])
        data["missioncontrol"]["config"]["defaults"]["max_tokens_per_run"] = max_tokens
        files["data.json"] = json.dumps(data, indent=2).encode()
    return files


def new_key() -> Ed25519PrivateKey:
    """A fresh ed25519 signing key."""
    return Ed25519PrivateKey.generate()


def signed(
    key: Ed25519PrivateKey,
    files: dict[str, bytes] | None = None,
    *,
    key_id: str = KEY_ID,
    after_signing: Callable[[dict[str, bytes]], None] | None = None,
) -> bytes:
    """``files`` (default: the repository's bundle) signed by ``key``, packed; ``after_signing``
    may change the files once the signature is made (to tamper, add or drop one)."""
    files = dict(files if files is not None else repo_files())
    out = {**files, artifacts.SIGNATURES: artifacts.sign_files(files, key, key_id)}
    if after_signing is not None:
        after_signing(out)
    return artifacts.pack(out)


def replacing(name: str, data: bytes) -> Callable[[dict[str, bytes]], None]:
    """An ``after_signing`` that sets (adds or changes) one file."""

    def change(files: dict[str, bytes]) -> None:
        files[name] = data

    return change


def dropping(name: str) -> Callable[[dict[str, bytes]], None]:
    """An ``after_signing`` that removes one file."""

    def change(files: dict[str, bytes]) -> None:
        del files[name]

    return change
