"""`runway-gateway demo` as a newcomer meets it: the README's walk-through, onboarding
commands and SDK snippet run against it exactly as printed, in a shell without the venv on
PATH; the demo key kept across starts, busy ports and a busy data directory named before
any key is printed, a signal stopping the simulator too, the banner once the gateway answers."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, Process, _wait_http, free_port, wait_until

KEY_LINE = re.compile(r"export KEY=(sk-gw-\S+)")
ADMIN_KEY_LINE = re.compile(r"RUNWAY_GATEWAY_ADMIN_KEY=(sk-gw-\S+)")
ID_PLACEHOLDER = "19da9384-..."


class Demo(Process):
    """`runway-gateway demo` on free ports with a data directory of the test's own."""

    def __init__(self, tmp: Path, data: Path, *extra: str, ports: tuple[int, int] | None = None):
        self.port, self.upstream_port = ports or (free_port(), free_port())
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [
                sys.executable,
                "-m",
                "gateway",
                "demo",
                "--port",
                str(self.port),
                "--upstream-port",
                str(self.upstream_port),
                "--data",
                str(data),
                *extra,
            ],
            tmp / f"demo-{self.port}.log",
        )
        self.key = self.admin_key = ""

    def start(self) -> None:
        super().start()
        _wait_http(self.url + "/readyz", self)
        self.key = wait_until(lambda: (m := KEY_LINE.search(self.log_text())) and m.group(1), message="the demo key")
        self.admin_key = wait_until(
            lambda: (m := ADMIN_KEY_LINE.search(self.log_text())) and m.group(1), message="the admin key"
        )

    def status_with(self, key: str) -> int:
        return httpx.get(self.url + "/runway/tasks", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


@pytest.fixture
def demos(tmp_path: Path) -> Iterator[list[Demo]]:
    """Demos this test started; all stopped at the end."""
    started: list[Demo] = []
    yield started
    for d in started:
        d.stop()


def start_demo(demos: list[Demo], tmp: Path, data: Path, *extra: str, ports: tuple[int, int] | None = None) -> Demo:
    demo = Demo(tmp, data, *extra, ports=ports)
    demos.append(demo)
    demo.start()
    return demo


# --- the README's walk-through -------------------------------------------------------


def readme_section(readme: str, heading: str) -> str:
    """The text under `heading` (a `## ` or `### ` line of README.md) up to the next `## `."""
    assert heading in readme, f"README.md has no {heading!r}"
    return readme.split(heading, 1)[1].split("\n## ", 1)[0]


def walk_through_commands(readme: str, heading: str = "## Walk-through") -> list[str]:
    """The shell commands of a README.md section, as a reader types them: its ```sh
    blocks, continuation lines joined, comment lines dropped."""
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", readme_section(readme, heading), re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return commands


def run_sh(command: str, key: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "KEY": key},
    )


def json_answer(proc: subprocess.CompletedProcess[str], command: str) -> dict[str, Any]:
    assert proc.returncode == 0, (command, proc.returncode, proc.stderr)
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"{command}\n did not answer JSON: {proc.stdout[:500]!r}") from None
    assert list(answer) != ["error"], (command, answer)  # an OpenAI-shaped error answer
    return answer


def test_every_command_of_the_readme_walk_through_works_against_the_demo(tmp_path: Path, demos: list[Demo]) -> None:
    demo = start_demo(demos, tmp_path, tmp_path / "data")
    commands = walk_through_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(commands) >= 5 and "/runway/tasks" in commands[0], commands
    task_id = ""
    polled = False
    for command in commands:
        typed = command.replace("localhost:8080", f"localhost:{demo.port}").replace(
            "localhost:8090", f"localhost:{demo.upstream_port}"
        )
        if ID_PLACEHOLDER in typed:
            assert task_id, f"{command}\n needs a task id before any create answered one"
            typed = typed.replace(ID_PLACEHOLDER, task_id)
        if output := re.search(r"-o (\S+)", typed):
            proc = run_sh(typed, demo.key, tmp_path)
            assert proc.returncode == 0, (command, proc.stderr)
            body = (tmp_path / output.group(1)).read_bytes()
            assert body[4:8] == b"ftyp", (command, body[:200])  # the demo's sample MP4, streamed through
        elif not task_id:
            task_id = json_answer(run_sh(typed, demo.key, tmp_path), command)["task"]["id"]
        elif not polled and re.search(rf"/runway/tasks/{task_id}\s", typed):
            # the reader repeats the poll until the task is done, as the README says
            wait_until(
                lambda typed=typed, command=command: (
                    json_answer(run_sh(typed, demo.key, tmp_path), command)["task"]["status"] == "SUCCEEDED"
                ),
                30,
                0.5,
                "SUCCEEDED",
            )
            polled = True
        else:
            answer = json_answer(run_sh(typed, demo.key, tmp_path), command)
            assert task_id in json.dumps(answer), (command, answer)
            assert answer.get("status", "completed") == "completed", (command, answer)  # a Video object
    assert polled, "the walk-through never polled its task"


ONBOARDING = "## Onboard a service in one minute"
FRESH_SHELL = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # a new terminal: no venv on PATH
DEMO_EXPORT_LINE = re.compile(r"^\s*(export RUNWAY_GATEWAY_URL=\S+ RUNWAY_GATEWAY_ADMIN_KEY=\S+)$", re.M)
KEY_ID_PLACEHOLDER = "key_8f3a..."


def reader_checkout(tmp: Path) -> Path:
    """A directory that looks to a shell like the reader's checkout after the README's
    first command: its `.venv` is the environment these tests run in."""
    assert sys.prefix != sys.base_prefix, "run the tests from a virtualenv, as the README's .venv"
    assert (Path(sys.prefix) / "bin" / "runway-gateway").exists(), "the package is not installed in this venv"
    checkout = tmp / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(sys.prefix)
    return checkout


def test_every_onboarding_command_of_the_readme_works_in_a_new_shell(tmp_path: Path, demos: list[Demo]) -> None:
    """README.md's onboarding block, line by line as printed, each in a new bash whose PATH
    has no venv: the `source`/`export` lines before it are its shell's state, the export line
    is the one the demo printed (the README's has placeholders), and `key_8f3a...` the id the
    key's creation printed (as the README says)."""
    demo = start_demo(demos, tmp_path, tmp_path / "data")
    checkout = reader_checkout(tmp_path)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = walk_through_commands(readme, ONBOARDING)
    printed = DEMO_EXPORT_LINE.search(demo.log_text())
    assert printed, demo.log_text()[-2000:]
    [tenant] = {m.group(1) for c in commands if (m := re.search(r"admin tenants create (\S+)", c))}
    example = tomllib.loads((ROOT / "config/gateway.example.toml").read_text(encoding="utf-8"))
    assert tenant not in [t["id"] for t in example["tenants"]]  # else 409 tenant_exists on a copy of it
    shell_state: list[str] = []
    key_id = ""
    ran = []
    for command in commands:
        typed = command
        if typed.startswith("export RUNWAY_GATEWAY_URL="):
            assert re.fullmatch(
                r"export RUNWAY_GATEWAY_URL=http://127\.0\.0\.1:8080 RUNWAY_GATEWAY_ADMIN_KEY=sk-gw-\.\.\.(\s+#.*)?",
                typed,
            ), typed
            typed = printed.group(1)
        if typed.startswith(("source ", ". ", "export ")):
            shell_state.append(typed)
            continue
        if KEY_ID_PLACEHOLDER in typed:
            assert key_id, f"{command}\n needs a key id before any command printed one"
            typed = typed.replace(KEY_ID_PLACEHOLDER, key_id)
        proc = subprocess.run(
            ["bash", "-c", "\n".join([*shell_state, typed])],
            capture_output=True,
            text=True,
            cwd=checkout,
            env={**FRESH_SHELL, "HOME": str(tmp_path)},
            timeout=60,
        )
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        if not key_id and (m := re.search(r"^id: (key_\S+)$", proc.stdout, re.M)):
            key_id = m.group(1)
        ran.append(command)
    assert len(ran) >= 10 and key_id, ran
    admin = {"Authorization": f"Bearer {demo.admin_key}"}
    made = httpx.get(f"{demo.url}/admin/v1/tenants/{tenant}", headers=admin, timeout=10).json()
    assert made["source"] == "api" and made["enabled"] is False, made  # the block's last command ran
    key = httpx.get(f"{demo.url}/admin/v1/keys/{key_id}", headers=admin, timeout=10).json()
    assert key["tenant"] == tenant and key["revoked_at"] is not None, key


def test_the_readme_openai_sdk_snippet_runs_as_printed(tmp_path: Path, demos: list[Demo]) -> None:
    """The Python snippet with `KEY` exported as the walk-through says, run as a script: the
    video downloaded, the list printed, and the deprecation warning the README mentions."""
    demo = start_demo(demos, tmp_path, tmp_path / "data")
    section = readme_section((ROOT / "README.md").read_text(encoding="utf-8"), "### With the official OpenAI SDK")
    [snippet] = re.findall(r"```python\n(.*?)```", section, re.S)
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace("localhost:8080", f"localhost:{demo.port}"), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**FRESH_SHELL, "HOME": str(tmp_path), "KEY": demo.key},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "completed"
    assert (tmp_path / "video.mp4").read_bytes()[4:8] == b"ftyp"
    assert "DeprecationWarning: The Sora API is scheduled to permanently shut down" in proc.stderr
    assert "DeprecationWarning" in section and "The Sora API is scheduled to permanently shut" in " ".join(
        section.split()
    )


# --- the demo's key and ports ----------------------------------------------------------


def test_the_demo_prints_the_same_key_on_every_start_and_new_key_replaces_it(tmp_path: Path, demos: list[Demo]) -> None:
    data = tmp_path / "data"
    first = start_demo(demos, tmp_path, data)
    assert first.status_with(first.key) == 200
    first.stop()

    again = start_demo(demos, tmp_path, data)
    assert again.key == first.key
    assert again.status_with(first.key) == 200
    again.stop()

    renewed = start_demo(demos, tmp_path, data, "--new-key")
    assert renewed.key != first.key
    assert renewed.status_with(renewed.key) == 200
    assert renewed.status_with(first.key) == 401


def test_the_demo_has_an_admin_key_for_the_console_and_the_admin_command(tmp_path: Path, demos: list[Demo]) -> None:
    data = tmp_path / "data"
    first = start_demo(demos, tmp_path, data)
    assert httpx.get(first.url + "/admin/", timeout=10).status_code == 200  # the console's page
    env = {"RUNWAY_GATEWAY_URL": first.url, "RUNWAY_GATEWAY_ADMIN_KEY": first.admin_key}
    listed = subprocess.run(
        [sys.executable, "-m", "gateway", "admin", "--json", "tenants", "list"],
        capture_output=True,
        text=True,
        env={**env, "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert [t["id"] for t in json.loads(listed.stdout)["data"]] == ["demo"]
    assert first.status_with(first.admin_key) == 401  # an admin key is no tenant key
    first.stop()
    again = start_demo(demos, tmp_path, data, "--new-key")  # kept across starts, even a new tenant key
    assert again.admin_key == first.admin_key


@pytest.mark.parametrize("busy_option", ["--port", "--upstream-port"])
def test_a_busy_port_is_named_before_any_key_is_printed(tmp_path: Path, busy_option: str) -> None:
    ports = {"--port": free_port(), "--upstream-port": free_port()}
    data = tmp_path / "data"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[busy_option]))
        holder.listen()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "demo",
                "--data",
                str(data),
                *(str(x) for kv in ports.items() for x in kv),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert f"port {ports[busy_option]} for the" in proc.stderr and busy_option in proc.stderr, said
    assert "sk-gw-" not in said and "curl" not in said, said
    assert not (data / "demo-secrets.json").exists()


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the demo checks and uvicorn binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_demo_stops_its_simulator_too(tmp_path: Path, demos: list[Demo], sig: int) -> None:
    """`kill PID` (or Ctrl-C) of the demo alone, not its process group: both ports free
    again, so the next demo starts on them."""
    data = tmp_path / "data"
    first = start_demo(demos, tmp_path, data)
    assert first.proc is not None
    os.kill(first.proc.pid, sig)
    assert first.proc.wait(timeout=20) == 0, first.log_text()[-2000:]
    wait_until(lambda: port_is_free(first.upstream_port) and port_is_free(first.port), 10, 0.05, "both ports free")
    again = start_demo(demos, tmp_path, data, ports=(first.port, first.upstream_port))
    assert again.status_with(first.key) == 200


def test_a_second_demo_on_the_same_data_directory_is_refused(tmp_path: Path, demos: list[Demo]) -> None:
    data = tmp_path / "data"
    first = start_demo(demos, tmp_path, data)
    assert first.proc is not None
    config = (data / "gateway.toml").read_text()
    secrets_kept = (data / "demo-secrets.json").read_text()
    second = Demo(tmp_path, data, "--new-key")
    refused = subprocess.run(second.args, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"demo: {data} is in use by another demo (pid {first.proc.pid}, gateway on port {first.port}): "
        "stop that one, or give this one a directory of its own with --data DIR"
    )
    assert "sk-gw-" not in refused.stdout + refused.stderr
    assert (data / "gateway.toml").read_text() == config  # the first demo's ports and keys, untouched
    assert (data / "demo-secrets.json").read_text() == secrets_kept
    assert first.status_with(first.key) == 200
    assert port_is_free(second.port) and port_is_free(second.upstream_port)  # no simulator left behind
    first.stop()
    demos.append(second)
    second.start()  # the directory is free once its demo is gone
    assert second.status_with(first.key) == 401 and second.status_with(second.key) == 200


def test_the_banner_appears_only_once_the_gateway_answers(tmp_path: Path, demos: list[Demo]) -> None:
    demo = Demo(tmp_path, tmp_path / "data")
    demos.append(demo)
    Process.start(demo)
    banner = f"  gateway:  {demo.url}"
    wait_until(lambda: banner in demo.log_text(), 30, 0.005, "the banner")
    # at once: no retry, as a reader copying the URL or the curl line would
    assert httpx.get(demo.url + "/readyz", timeout=5).status_code == 200
    assert httpx.get(demo.url + "/admin/", timeout=5).status_code == 200  # the console URL it prints
    assert (
        httpx.get(demo.url + "/runway/tasks", headers={"Authorization": f"Bearer {_key(demo)}"}, timeout=5).status_code
        == 200
    )


def _key(demo: Demo) -> str:
    m = KEY_LINE.search(demo.log_text())
    assert m, demo.log_text()[-2000:]
    return m.group(1)


def test_new_key_prints_a_key_and_its_hash() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "new-key"], capture_output=True, text=True, cwd=ROOT
    ).stdout.split()
    key, hashed = out
    import hashlib

    assert key.startswith("sk-gw-") and len(key) >= 6 + 43
    assert hashed == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
