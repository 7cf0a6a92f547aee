"""push_folder against the fake Hub: server-side weight copies, idempotence, PRs, branches, failures."""

from __future__ import annotations

import signal
import time

import pytest
from hub_helpers import (
    WRITE_TOKEN,
    cli_process,
    digest_tree,
    exported_folder,
    fake_plan,
    hub_env,
    run_cli,
    seed_base,
    tiny_llama,
)
from hub_server import FakeHub

from moa_hub.errors import HubError
from moa_hub.push import PushConfig, push_folder


@pytest.fixture(autouse=True)
def _no_xet(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture()
def hub():
    with FakeHub(tokens={WRITE_TOKEN: "alice", "hf_bob_read_only_token_000": "bob"}) as server:
        yield server


@pytest.fixture()
def export(tmp_path, hub):
    sha = seed_base(hub, tiny_llama(tmp_path / "base"))
    return exported_folder(tmp_path / "out", fake_plan(base="meta/tiny", revision=sha))


def _config(hub, **kw) -> PushConfig:
    return PushConfig(repo_id=kw.pop("repo_id", "alice/tiny-moa"), token=WRITE_TOKEN, endpoint=hub.endpoint, **kw)


def test_push_copies_weights_server_side_and_rerun_is_idempotent(hub, export):
    result = push_folder(export, _config(hub))
    actions = {f.path_in_repo: f.action for f in result.files}
    assert actions["model.safetensors"] == "copy" and actions["config.json"] == "upload"
    assert {"README.md", "images/moa_spans.png", "images/moa_density.png"} <= set(actions)
    assert not [r for r in hub.requests if r[0] == "PUT"], "weights must not be uploaded when they can be copied"
    for path, digest in digest_tree(export).items():
        import hashlib

        assert hashlib.sha256(hub.read("alice/tiny-moa", path)).hexdigest() == digest, path
    commits = len(hub.commit_payloads)
    again = push_folder(export, _config(hub))
    assert {f.action for f in again.files} == {"unchanged"} and again.commit_sha is None
    assert len(hub.commit_payloads) == commits


def test_dry_run_changes_nothing(hub, export):
    result = push_folder(export, _config(hub, dry_run=True))
    assert result.dry_run and "alice/tiny-moa" not in hub.repos
    assert {f.action for f in result.files} == {"copy", "upload"}


def test_upload_when_base_is_unknown_and_pr_and_branch(hub, tmp_path):
    folder = exported_folder(tmp_path / "local", fake_plan(base=str(tmp_path / "base-folder"), revision=None))
    pushed = push_folder(folder, _config(hub, private=True))
    assert {f.action for f in pushed.files} == {"upload"} and hub.repos["alice/tiny-moa"].private
    (folder / "moa_plan.json").write_text('{"changed": true}')
    main_before = hub.repos["alice/tiny-moa"].branches["main"]
    pr = push_folder(folder, _config(hub, create_pr=True))
    assert pr.pr_url and hub.repos["alice/tiny-moa"].branches["main"] == main_before
    assert [f.path_in_repo for f in pr.files if f.action == "upload"] == ["moa_plan.json"]
    branch = push_folder(folder, _config(hub, revision="v1"))
    assert hub.read("alice/tiny-moa", "moa_plan.json", "v1") == b'{"changed": true}'
    assert branch.commit_sha == hub.repos["alice/tiny-moa"].branches["v1"]


def test_no_write_access_is_clear(hub, export):
    with pytest.raises(HubError, match="403|write access") as info:
        push_folder(export, PushConfig(repo_id="alice/x", token="hf_bob_read_only_token_000", endpoint=hub.endpoint))
    assert "moa-hub push" in str(info.value) and "hf_bob" not in str(info.value)


def _assert_failed_cleanly(proc, token, before, folder, *expected):
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert token not in text
    assert f"moa-hub push {folder}" in text
    assert any(e in text for e in expected), text
    after = digest_tree(folder)  # nothing changed or lost (a missing card may have been added)
    assert {path: after.get(path) for path in before} == before


def test_cli_bad_token(hub, export, tmp_path):
    bad = "hf_this_token_is_not_valid_987654321"
    before = digest_tree(export)
    proc = run_cli(
        ["push", str(export), "--repo-id", "alice/tiny-moa", "--token", bad], hub_env(tmp_path, hub.endpoint)
    )
    _assert_failed_cleanly(proc, bad, before, export, "rejected the token", "401")
    assert "alice/tiny-moa" not in hub.repos


def test_cli_unreachable_endpoint(export, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    before = digest_tree(export)
    env = hub_env(tmp_path, f"http://127.0.0.1:{port}", token=WRITE_TOKEN)
    proc = run_cli(["push", str(export), "--repo-id", "alice/tiny-moa"], env)
    _assert_failed_cleanly(proc, WRITE_TOKEN, before, export, "cannot reach")


def test_cli_commit_fails_after_upload(hub, export, tmp_path):
    hub.fail_commit = True
    before = digest_tree(export)
    proc = run_cli(["push", str(export), "--repo-id", "alice/tiny-moa"], hub_env(tmp_path, hub.endpoint, WRITE_TOKEN))
    _assert_failed_cleanly(proc, WRITE_TOKEN, before, export, "500")
    assert hub.tree("alice/tiny-moa") == {}, "a failed commit must leave the repo untouched"


def test_cli_interrupted_mid_upload(hub, tmp_path):
    folder = exported_folder(tmp_path / "local", fake_plan(base=str(tmp_path / "nowhere")))
    from moa_hub.card import CardConfig, write_card

    write_card(folder, CardConfig(repo_id="alice/tiny-moa"))
    before = digest_tree(folder)
    hub.hold_uploads.clear()
    proc = cli_process(
        ["push", str(folder), "--repo-id", "alice/tiny-moa"], hub_env(tmp_path, hub.endpoint, WRITE_TOKEN)
    )
    assert hub.upload_started.wait(timeout=60), "the upload never started"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    hub.hold_uploads.set()
    out, err = proc.communicate(timeout=60)
    import subprocess

    _assert_failed_cleanly(
        subprocess.CompletedProcess(proc.args, proc.returncode, out, err), WRITE_TOKEN, before, folder, "interrupted"
    )
    assert hub.tree("alice/tiny-moa") == {}


def test_cli_dry_run_prints_plan(hub, export, tmp_path):
    proc = run_cli(
        ["push", str(export), "--repo-id", "alice/tiny-moa", "--dry-run"], hub_env(tmp_path, hub.endpoint, WRITE_TOKEN)
    )
    assert proc.returncode == 0, proc.stderr
    assert "copy      model.safetensors  <- meta/tiny@" in proc.stdout and "dry run" in proc.stdout
    assert WRITE_TOKEN not in proc.stdout + proc.stderr
