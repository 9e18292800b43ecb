"""The conformance suite (shiphook.testing) against the scripted test backend."""

from __future__ import annotations

import tomllib
import uuid
from typing import Any

import pytest
from scripted_backend import ScriptedBackend, ScriptedOptions
from shiphook.testing import BackendConformance, JobRun, toml_table

pytest_plugins = ["shiphook.testing", "pytester"]


class TestScriptedConformance(BackendConformance):
    plugin = "scripted"
    plugin_modules = ("scripted_backend",)
    rollout_timeout = 10
    initial_tag = "initial"
    healthy_tag = "v2"
    failing_tag = "bad"
    failing_reason = "task exited with code 1"
    other_failing_tag = "bad-again"
    stalling_tag = "hang"
    stall_timeout = 2
    job_tag = "initial"
    other_job_tag = "other"
    job_variable = ("GREETING", "hello")
    failing_run_reason = "task exited with code 3"
    stalling_job_tag = "hang"

    @property
    def orchestrator(self) -> ScriptedBackend:
        return ScriptedBackend(ScriptedOptions(state_dir=str(self.tmp_path / "orchestrator")))

    def backend_options(self) -> dict[str, Any]:
        return {"state_dir": str(self.tmp_path / "orchestrator")}

    def unreachable_options(self) -> dict[str, Any]:
        return {"unreachable": "connection refused"}

    def silent_options(self, address: str) -> dict[str, Any]:
        return {"address": address, "timeout": 1}

    def make_app(self) -> dict[str, Any]:
        return {"name": f"web-{uuid.uuid4().hex[:8]}"}

    def make_job(self) -> dict[str, Any]:
        return {"name": f"job-{uuid.uuid4().hex[:8]}", "env": dict([self.job_variable])}

    def missing_workload(self, kind: str) -> dict[str, Any]:
        return {"name": "missing-workload"}

    def workload_image(self, options: dict[str, Any]) -> str:
        return self.orchestrator.image(options["name"]) or "registry.test/app:initial"

    def running_images(self, options: dict[str, Any]) -> list[str]:
        return [self.workload_image(options)]

    def workload_version(self, options: dict[str, Any]) -> str:
        return str(self.orchestrator.generation(options["name"]))

    def job_run(self, options: dict[str, Any], deployment: dict[str, Any]) -> JobRun:
        with self.orchestrator.state() as s:
            run = s["runs"][deployment["id"]]
        return JobRun(image=f"registry.test/app:{run['tag'] or 'initial'}", env=run["env"])

    def job_runs(self, options: dict[str, Any]) -> int:
        with self.orchestrator.state() as s:
            return sum(run["name"] == options["name"] for run in s.get("runs", {}).values())

    def change_by_hand(self, options: dict[str, Any]) -> None:
        self.orchestrator.change_by_hand(options["name"])

    def changed_by_hand(self, options: dict[str, Any]) -> bool:
        return self.workload_image(options).endswith(":hotfix")


class TestForwardOnlyConformance(TestScriptedConformance):
    """A backend that cannot roll back: a target asking for it is refused, and the scenarios
    that call for a rollback expect the rollout left as it failed."""

    plugin = "scripted-forward"
    plugin_modules = ("forward_only",)


def test_a_harness_cannot_override_or_mark_a_scenario():
    with pytest.raises(TypeError, match="cannot override or mark scenarios"):

        class TestSkipping(TestScriptedConformance):
            def test_a_failing_job_run_fails_with_the_orchestrators_reason(self):
                pass


@pytest.mark.parametrize(
    "name", ["_requires", "_ended", "_crash_once", "_before_first", "_conformance"]
)
def test_a_harness_cannot_override_the_suites_machinery(name):
    """A `_requires` that skipped, or an `_ended` that said succeeded, would pass anything."""
    with pytest.raises(TypeError, match=f"TestLenient.{name}: a conformance harness cannot"):
        type("TestLenient", (TestScriptedConformance,), {name: lambda *args, **kwargs: None})


def test_the_plugin_refuses_skip_marks_on_scenarios(pytester):
    pytester.makepyfile(
        """
        import pytest
        from shiphook.testing import BackendConformance

        pytest_plugins = ["shiphook.testing"]
        pytestmark = pytest.mark.skip("too slow")


        class TestAgain(BackendConformance):
            plugin = "scripted"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--rootdir={pytester.path}")
    result.stderr.fnmatch_lines(["*conformance scenarios cannot be skipped*"])


def test_the_harness_writes_any_json_options_as_toml():
    """What `backend_options` and the harness's target methods return: tables too."""
    keys = {"plugin": "p", "commands": {"1.0": ["/bin/sleep", "9"], "a b": {}}, "on": True}
    keys |= {"weight": 1.5, "tags": ["x", 'q"uote']}
    assert tomllib.loads(toml_table("backends.x", keys)) == {"backends": {"x": keys}}
