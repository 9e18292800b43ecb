"""A throwaway backend for tests and benchmarks; never shipped.

Its behaviour is scripted by the image tag a hook sends, so a test can drive every path of the
engine through the real HTTP API:

| tag starts with | deploy                                                      |
|-----------------|-------------------------------------------------------------|
| (anything else) | succeeds after `polls` progress calls (or `rollout_seconds`) |
| `bad`           | the rollout fails: "task exited with code 1"                |
| `hang`          | the rollout, or the job run, never ends (timeout)           |
| `transientN`    | deploy raises a transient error N times, then works         |
| `down`          | every call raises a transient error (retry budget runs out) |
| `unreadable`    | deploy works, progress raises a transient error every time  |
| `perm`          | deploy raises a permanent error                             |
| `crash`         | deploy raises an unexpected exception (a plugin bug)        |
| `stall`         | deploy takes `stall_seconds` to return                       |

A rollout in progress reports "updating: 0 of 2 tasks" for its first half of `polls`, then
"updating: 1 of 2 tasks". Deploying the tag a target runs already succeeds at once, without a
rollout. A job run fails when its env has `EXIT` other than `0`; it runs
`<repository>:<imageTag>`, by default `<repository>:initial`; one of an `unreadable` tag starts,
then its progress raises a transient error on every call. A target whose `name` starts with
`missing` does not exist. With `address`, every call first waits `timeout` seconds for that
address to answer (the conformance suite's orchestrator that never does). With `state_dir`, state
and the log of calls live in a file, shared by every process (crash and replica tests read it
after the server is gone). `fail_in` names a method that raises an unexpected exception on every
call, `garbage_from` one that returns something the Backend contract does not allow (a key of
`GARBAGE`: the method, or the method and what is wrong with what it returns).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from shiphook import Backend, BackendError, Progress, Target, TargetState, hookimpl

# what a method returns with `garbage_from`: not what the Backend contract says
GARBAGE: dict[str, Any] = {
    "describe": "registry.test/app:1",
    "deploy": {"at": {1, 2}},
    "deploy-without-image": {"service": "web"},
    "run_job": ["a ref"],
    "progress": "succeeded",
    "progress-in-no-state": Progress("done", "all good"),  # type: ignore[arg-type]
    "rollback": None,
}


class ScriptedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state_dir: str | None = None
    polls: int = 1
    rollout_seconds: float = 0.0
    unreachable: str | None = None
    address: str | None = None
    timeout: float = 2.0
    stall_seconds: float = 30.0
    fail_in: str | None = None
    garbage_from: str | None = None


class ScriptedTargetOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    repository: str = "registry.test/app"
    env: dict[str, str] = {}  # a job's own variables, which a run's overrides replace


class ScriptedBackend(Backend):
    name = "scripted"
    description = "test backend scripted by image tags"
    Options = ScriptedOptions
    TargetOptions = ScriptedTargetOptions
    poll_interval = 0.02

    def __init__(self, options: ScriptedOptions) -> None:
        super().__init__(options)
        self._lock = threading.Lock()
        self._memory: dict[str, Any] = {}
        self._path = Path(options.state_dir) / "scripted-state.json" if options.state_dir else None

    # -- state shared by threads and, with state_dir, processes --------------------

    @contextlib.contextmanager
    def state(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            if self._path is None:
                yield self._memory
                return
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._path.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                data = json.loads(self._path.read_text()) if self._path.exists() else {}
                try:
                    yield data
                finally:  # a scripted error is raised in here, after its call was counted
                    tmp = self._path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(data))
                    tmp.replace(self._path)

    def calls(self, op: str | None = None) -> list[dict[str, Any]]:
        with self.state() as s:
            return [c for c in s.get("calls", []) if op is None or c["op"] == op]

    def image(self, target: str) -> str | None:
        with self.state() as s:
            return s.get("images", {}).get(target)

    def _log(self, s: dict[str, Any], op: str, *, at: float | None = None, **fields: Any) -> None:
        """Record a call; `at` is when it arrived (before this recording's own file work)."""
        s.setdefault("calls", []).append(
            {"op": op, "at": time.time() if at is None else at, "server": os.getpgrp(), **fields}
        )

    @staticmethod
    def _enter(s: dict[str, Any], target: str) -> None:
        """Count a rollout or run as in flight until its progress first reports an end."""
        in_flight = s.setdefault("in_flight", {})
        in_flight[target] = in_flight.get(target, 0) + 1
        peak = s.setdefault("max_in_flight", {})
        peak[target] = max(peak.get(target, 0), in_flight[target])

    @staticmethod
    def _leave(s: dict[str, Any], target: str, deployment_id: str) -> None:
        ended = s.setdefault("ended", {})
        if deployment_id not in ended:
            ended[deployment_id] = True
            s["in_flight"][target] -= 1

    def max_in_flight(self, target: str) -> int:
        with self.state() as s:
            return s.get("max_in_flight", {}).get(target, 0)

    # -- Backend -----------------------------------------------------------------------

    def check(self) -> str:
        if self.options.unreachable:
            raise BackendError(self.options.unreachable, transient=True)
        if self.options.address:
            host, port = self.options.address.rsplit(":", 1)
            try:
                with socket.create_connection((host, int(port)), self.options.timeout) as conn:
                    conn.sendall(b"ping\n")
                    conn.recv(1)
            except OSError as exc:
                raise BackendError(f"{self.options.address}: {exc}", transient=True) from None
        return "scripted backend ready"

    def _misbehave(self, method: str) -> bool:
        """Raise for `fail_in`; true when `method` is to return `garbage()` (`garbage_from`)."""
        if self.options.fail_in == method:
            raise RuntimeError(f"a bug in the plugin's {method}")
        return (self.options.garbage_from or "").partition("-")[0] == method

    def garbage(self) -> Any:
        return GARBAGE[self.options.garbage_from or ""]

    def generation(self, name: str) -> int:
        """How many times the workload `name` has changed: its rollouts and changes by hand
        (rollbacks are not counted)."""
        with self.state() as s:
            return s.get("generation", {}).get(name, 0)

    def change_by_hand(self, name: str) -> None:
        """Someone else sets the workload's image to `hotfix`."""
        with self.state() as s:
            images = s.setdefault("images", {})
            images[name] = f"{images[name].rpartition(':')[0]}:hotfix"
            generation = s.setdefault("generation", {})
            generation[name] = generation.get(name, 0) + 1

    def describe(self, target: Target) -> TargetState:
        if self._misbehave("describe"):
            return self.garbage()
        self.check()
        if target.options.name.startswith("missing"):
            raise BackendError(f"service {target.options.name} not found")
        with self.state() as s:
            images = s.setdefault("images", {})
            image = images.setdefault(target.options.name, f"{target.options.repository}:initial")
        return TargetState(image=image)

    def deploy(self, target: Target, *, image_tag: str, deployment_id: str) -> dict[str, Any]:
        called = time.time()
        if self._misbehave("deploy"):
            return self.garbage()
        self.check()
        if image_tag.startswith("stall"):
            time.sleep(self.options.stall_seconds)
        with self.state() as s:
            attempts = s.setdefault("attempts", {})
            attempts[deployment_id] = attempts.get(deployment_id, 0) + 1
            self._log(
                s, "deploy", at=called, target=target.name, tag=image_tag, deployment=deployment_id
            )
            flaky = re.match(r"transient(\d+)", image_tag)
            if flaky and attempts[deployment_id] <= int(flaky.group(1)):
                raise BackendError("connection refused", transient=True)
            if image_tag.startswith("down"):
                raise BackendError("connection refused", transient=True)
            if image_tag.startswith("crash"):
                raise KeyError("a bug in the plugin")
            if image_tag.startswith("perm"):
                raise BackendError(f"invalid image reference {image_tag!r}")
            images = s.setdefault("images", {})
            name, repository = target.options.name, target.options.repository
            wanted = f"{repository}:{image_tag}"
            if deployment_id not in s.setdefault("previous", {}):  # idempotent on a repeat
                s["previous"][deployment_id] = images.get(name, f"{repository}:initial")
                if s["previous"][deployment_id] != wanted:
                    images[name] = wanted
                    generation = s.setdefault("generation", {})
                    generation[name] = generation.get(name, 0) + 1
                    self._enter(s, target.name)
                # the generation this deployment left: its rollback is refused once that changed
                s.setdefault("deployed", {})[deployment_id] = s.get("generation", {}).get(name, 0)
            unchanged = s["previous"][deployment_id] == wanted
        return {
            "op": "deploy",
            "deployment": deployment_id,
            "tag": image_tag,
            "image": wanted,
            "at": time.time(),
            "unchanged": unchanged,
        }

    def run_job(
        self, target: Target, *, env: dict[str, str], image_tag: str | None, deployment_id: str
    ) -> dict[str, Any]:
        if self._misbehave("run_job"):
            return self.garbage()
        self.check()
        with self.state() as s:
            runs = s.setdefault("runs", {})
            if deployment_id not in runs:  # idempotent per deployment, like a derived job name
                runs[deployment_id] = {
                    "env": target.options.env | env,
                    "tag": image_tag,
                    "name": target.options.name,
                }
                self._log(s, "run", target=target.name, env=env, deployment=deployment_id)
                self._enter(s, target.name)
        image = f"{target.options.repository}:{image_tag or 'initial'}"
        return {"op": "run", "deployment": deployment_id, "image": image, "at": time.time()}

    def progress(self, target: Target, ref: dict[str, Any]) -> Progress:
        if self._misbehave("progress"):
            return self.garbage()
        self.check()
        with self.state() as s:
            polls = s.setdefault("polls", {})
            key = f"{ref['op']}:{ref['deployment']}"
            polls[key] = polls.get(key, 0) + 1
            count = polls[key]
            run = s.get("runs", {}).get(ref["deployment"])
        if ref["image"].rpartition(":")[2].startswith("unreadable"):
            raise BackendError("connection refused", transient=True)
        if ref["op"] == "run":
            if count < self.options.polls or ref["image"].rpartition(":")[2].startswith("hang"):
                return Progress("running", "job running")
            with self.state() as s:
                self._leave(s, target.name, ref["deployment"])
            if run and run["env"].get("EXIT", "0") != "0":
                return Progress("failed", f"task exited with code {run['env']['EXIT']}")
            return Progress("succeeded", "job completed")
        if ref["op"] == "rollback":
            if ref["image"].rpartition(":")[2].startswith("bad"):  # a failure left in place
                return Progress("failed", "rollback paused: task exited with code 1")
            return Progress("succeeded", f"restored {ref['image']}")
        tag = ref["tag"]
        if ref.get("unchanged"):  # no rollout: the workload's health is the answer
            if tag.startswith("bad"):
                return Progress("failed", "update paused: task exited with code 1")
            return Progress("succeeded", f"{target.options.name} already runs {tag}")
        if tag.startswith("hang"):
            return Progress("running", "1/2 tasks updated")
        elapsed = time.time() - ref["at"]
        if count < self.options.polls or elapsed < self.options.rollout_seconds:
            return Progress(
                "running", f"updating: {int(count * 2 >= self.options.polls)} of 2 tasks"
            )
        with self.state() as s:
            self._leave(s, target.name, ref["deployment"])
        if tag.startswith("bad"):
            return Progress("failed", "update paused: task exited with code 1")
        return Progress("succeeded", "update completed")

    def rollback(self, target: Target, ref: dict[str, Any]) -> dict[str, Any]:
        if self._misbehave("rollback"):
            return self.garbage()
        self.check()
        with self.state() as s:
            previous = s.get("previous", {}).get(ref["deployment"])
            if previous is None:
                raise BackendError(f"service {target.options.name} does not have a previous spec")
            name = target.options.name
            if s.get("generation", {}).get(name, 0) != s.get("deployed", {}).get(ref["deployment"]):
                raise BackendError(
                    f"service {name} was changed since this deployment: a rollback would undo "
                    "that change too; look at it and deploy again"
                )
            s["images"][name] = previous
            self._log(s, "rollback", target=target.name, deployment=ref["deployment"])
            self._leave(s, target.name, ref["deployment"])  # a timed-out rollout ends here
        return {"op": "rollback", "deployment": ref["deployment"], "image": previous}


@hookimpl
def register_backends(register) -> None:
    register(ScriptedBackend)
