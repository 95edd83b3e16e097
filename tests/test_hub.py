"""Pushing to the Hub through huggingface_hub's real client against a local server on 127.0.0.1 that
speaks the Hub API (create repo, branch, YAML validation, preupload, commit) and records every call:
the files it receives are the staged folder's, the model card is there, and what was pushed loads with
plain transformers / peft. A dry run makes no call."""

from __future__ import annotations

import base64
import http.server
import json
import threading

import pytest

from conftest import FAST, fast_recipe, one_error_line
from workbench import hub
from workbench.config import HubConfig
from workbench.train import run


class FakeHub(http.server.ThreadingHTTPServer):
    """The Hub API endpoints an upload_folder uses; unknown ones answer 404 (and are recorded too)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.deny = False  # answer every write 403, as the Hub does for a token without write access
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.calls.append({"method": "GET", "path": self.path, "auth": self.headers.get("authorization")})
        self._reply(404, {"error": "not found"})

    def do_POST(self):
        srv: FakeHub = self.server
        raw = self.rfile.read(int(self.headers.get("content-length", 0)))
        path = self.path.split("?")[0]
        call = {"method": "POST", "path": path, "auth": self.headers.get("authorization")}
        srv.calls.append(call)
        if srv.deny:
            return self._reply(403, {"error": "You don't have the rights to create a model under this namespace"})
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            body = json.loads(raw)
            repo = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            call["body"] = body
            srv.repos.setdefault(repo, {"private": body.get("visibility") == "private", "branches": {"main": {}}})
            return self._reply(200, {"url": f"{srv.url}/{repo}"})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if len(parts) >= 5 and parts[:2] == ["api", "models"]:
            repo, action, rev = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            if repo not in srv.repos:
                return self._reply(404, {"error": "Repository not found"})
            if action == "branch":
                srv.repos[repo]["branches"].setdefault(rev, dict(srv.repos[repo]["branches"]["main"]))
                return self._reply(200, {})
            if action == "preupload":
                files = json.loads(raw)["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for f in files]})
            if action == "commit":
                if rev not in srv.repos[repo]["branches"]:
                    return self._reply(404, {"error": f"Revision not found: {rev}"})
                lines = [json.loads(x) for x in raw.decode().splitlines() if x.strip()]
                call["header"] = next(x["value"] for x in lines if x["key"] == "header")
                for x in lines:
                    if x["key"] == "file":
                        assert x["value"]["encoding"] == "base64"
                        srv.repos[repo]["branches"][rev][x["value"]["path"]] = base64.b64decode(x["value"]["content"])
                return self._reply(200, {"commitUrl": f"{srv.url}/{repo}/commit/0123abcd", "commitOid": "0123abcd" * 5,
                                         "pullRequestUrl": None})
        return self._reply(404, {"error": f"no such endpoint {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub.constants

    server = FakeHub()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)  # what HfApi() defaults to
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def kd_dir(tmp_path_factory, tiny_teacher, accelerator):
    out = tmp_path_factory.mktemp("kd_hub")
    run(fast_recipe("kd_tiny", out, "teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}"), accelerator)
    return out


def _staged(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_merged_student_is_pushed_with_its_card_and_loads(kd_dir, fake_hub, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    url = hub.push(kd_dir, HubConfig(repo_id="me/kd-tiny", private=True))
    assert url == f"{fake_hub.url}/me/kd-tiny/commit/0123abcd"
    posts = [c for c in fake_hub.calls if c["method"] == "POST"]  # (the client may also GET its telemetry list)
    assert [c["path"] for c in posts] == ["/api/repos/create", "/api/validate-yaml",
                                          "/api/models/me/kd-tiny/preupload/main", "/api/models/me/kd-tiny/commit/main"]
    assert all(c["auth"] == "Bearer hf_fake_token_for_tests" for c in posts)
    assert posts[-1]["header"]["summary"] == "Upload student trained with workbench"
    create = posts[0]["body"]
    assert create["name"] == "kd-tiny" and create["organization"] == "me" and fake_hub.repos["me/kd-tiny"]["private"]
    received = fake_hub.repos["me/kd-tiny"]["branches"]["main"]
    assert received == _staged(kd_dir / hub.UPLOAD_DIR)  # exactly the staged folder, byte for byte
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "README.md"} <= set(received)
    assert "distill_heads.safetensors" not in received
    card = received["README.md"].decode()
    assert card.startswith("---\nlibrary_name: transformers\n") and "## Intended use" in card
    assert "validation perplexity" in card and "1 x forward_kl" not in card and "0.5 x forward_kl (T=1)" in card
    for name, data in received.items():
        (tmp_path / name).write_bytes(data)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(tmp_path))


def test_adapter_is_pushed_to_a_new_public_branch_and_loads_with_peft(tiny_teacher, fake_hub, tmp_path, accelerator):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    run(fast_recipe("kd_tiny", out, "teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}",
                    "student.tiny=null", f"student.name_or_path={tiny_teacher}",
                    "student.adapter={method: lora, r: 4, alpha: 8}"), accelerator)
    hub.push(out, HubConfig(repo_id="org/lora-student", private=False, revision="dev"))
    paths = [c["path"] for c in fake_hub.calls if c["method"] == "POST"]
    assert "/api/models/org/lora-student/branch/dev" in paths and paths[-1] == "/api/models/org/lora-student/commit/dev"
    assert fake_hub.repos["org/lora-student"]["private"] is False
    received = fake_hub.repos["org/lora-student"]["branches"]["dev"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(received)
    assert "model.safetensors" not in received
    assert "library_name: peft" in received["README.md"].decode()
    (tmp_path / "got").mkdir()
    for name, data in received.items():
        (tmp_path / "got" / name).write_bytes(data)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_teacher), tmp_path / "got")
    assert adapted.peft_config["default"].r == 4
    # content=merged pushes the merged model of the same run instead
    hub.push(out, HubConfig(repo_id="org/lora-merged", content="merged"))
    assert "model.safetensors" in fake_hub.repos["org/lora-merged"]["branches"]["main"]
    full = tmp_path / "full"
    run(fast_recipe("sft_tiny", full, "train.max_steps=2"), accelerator)
    with pytest.raises(FileNotFoundError, match="trained no adapter"):
        hub.stage(full, HubConfig(content="adapter"))


def test_dry_run_writes_the_folder_and_calls_nothing(kd_dir, fake_hub):
    assert hub.main([str(kd_dir), "--repo-id", "me/dry", "--dry-run"]) == 0
    assert fake_hub.calls == []
    assert (kd_dir / hub.UPLOAD_DIR / "README.md").is_file()
    assert hub.main([str(kd_dir)]) == 2  # no repo id anywhere


def test_staging_onto_a_full_disk_keeps_the_last_staged_folder(kd_dir, fake_hub, capsys, monkeypatch):
    """Copying the model into the upload folder runs out of space: one line naming the folder, nothing
    pushed, the partial copy removed and the folder an earlier stage wrote left as it was."""
    import errno

    assert hub.main([str(kd_dir), "--repo-id", "me/dry", "--dry-run"]) == 0
    before = _staged(kd_dir / hub.UPLOAD_DIR)

    def copy2(src, dst):
        with open(dst, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(hub.shutil, "copy2", copy2)
    line = one_error_line(hub.main([str(kd_dir), "--repo-id", "me/full"]), capsys.readouterr().err)
    assert line == f"error: No space left on device (writing {kd_dir / hub.UPLOAD_DIR})"
    assert fake_hub.calls == [] and not (kd_dir / (hub.UPLOAD_DIR + ".tmp")).exists()
    assert _staged(kd_dir / hub.UPLOAD_DIR) == before


def test_training_pushes_at_the_end(tiny_teacher, fake_hub, tmp_path, accelerator):
    out = tmp_path / "auto"
    run(fast_recipe("kd_tiny", out, "teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}",
                    "output.push_to_hub=true", "output.hub.repo_id=me/auto", "eval.report=true", "eval.prompts=2",
                    "eval.max_new_tokens=4", "eval.choice_items=4", "eval.samples=1"), accelerator)
    received = fake_hub.repos["me/auto"]["branches"]["main"]
    assert received == _staged(out / hub.UPLOAD_DIR)
    card = received["README.md"].decode()
    assert "ROUGE-L" in card and "As the draft model for speculative decoding" in card


def test_push_settings_are_validated():
    from workbench.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="needs output.hub.repo_id"):
        load_recipe("kd_tiny", ["output.push_to_hub=true"])
    with pytest.raises(RecipeError, match="not 'user-or-org/name'"):
        load_recipe("kd_tiny", ["output.hub.repo_id=no-slash"])
    for bad in ["../x", "a..b/c", "me/x-", "me/.x"]:  # the Hub's own rules, before anything is staged
        with pytest.raises(RecipeError, match=r"output\.hub\.repo_id: (Repo id must use|Cannot have)"):
            load_recipe("kd_tiny", [f"output.hub.repo_id={bad}"])
    for bad in ["''", "../../x", "a b", "x.lock", "-x", "x/", "a//b", "x@{1}", "x~1", "a:b"]:
        with pytest.raises(RecipeError, match="output.hub.revision: .* is not a branch name git would take"):
            load_recipe("kd_tiny", ["output.hub.repo_id=me/x", f"output.hub.revision={bad}"])
    for good in ["main", "feature/kd-1", "v1.0", "run_2"]:
        assert load_recipe("kd_tiny", ["output.hub.repo_id=me/x.y_z-1", f"output.hub.revision={good}"])


def test_a_refused_or_unreachable_push_is_one_line_and_keeps_the_run(kd_dir, tiny_teacher, fake_hub, tmp_path,
                                                                      monkeypatch, capsys):
    """The Hub refusing the token (403) or not answering at all: one error line that says how to push
    later, exit status 2, not huggingface_hub's traceback; at the end of training the model stays saved."""
    import huggingface_hub.constants

    from workbench import train

    def one_line(code):
        return one_error_line(code, capsys.readouterr().err)

    fake_hub.deny = True
    line = one_line(hub.main([str(kd_dir), "--repo-id", "me/denied"]))
    assert "pushing to me/denied failed" in line and "don't have the rights" in line
    assert f"push it later with python -m workbench.hub {kd_dir}" in line

    out = tmp_path / "denied_at_the_end"
    line = one_line(train.main(["recipe=kd_tiny", *FAST, f"output.dir={out}", "teacher.recipe=null",
                                f"teacher.name_or_path={tiny_teacher}", "output.push_to_hub=true",
                                "output.hub.repo_id=me/denied", "eval.report=false"]))
    assert "pushing to me/denied failed" in line and (out / "model" / "model.safetensors").is_file()

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:1")  # nothing listens there
    line = one_line(hub.main([str(kd_dir), "--repo-id", "me/nowhere"]))
    assert "pushing to me/nowhere failed" in line
