"""The core ships no orchestrator client; each built-in backend is a distribution of its own."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PLUGIN_PROJECTS = sorted((ROOT / "plugins").glob("*/pyproject.toml"))


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_core_depends_on_no_orchestrator_client_and_registers_no_backend():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not requirement_names(project["dependencies"]) & {"docker", "kubernetes", "python-nomad"}
    assert "shiphook" not in project.get("entry-points", {})
    core = importlib.metadata.distribution("shiphook")
    assert [ep for ep in core.entry_points if ep.group == "shiphook"] == []


@pytest.mark.parametrize("pyproject", PLUGIN_PROJECTS, ids=lambda p: p.parent.name)
def test_each_built_in_backend_is_an_installed_distribution_with_its_entry_point(pyproject):
    project = tomllib.loads(pyproject.read_text())["project"]
    assert "shiphook" in requirement_names(project["dependencies"])
    (entry_point,) = project["entry-points"]["shiphook"].items()
    installed = importlib.metadata.distribution(project["name"])  # make install installed it
    assert [(ep.name, ep.value) for ep in installed.entry_points if ep.group == "shiphook"] == [
        entry_point
    ]


def test_the_swarm_distribution_brings_the_docker_sdk():
    assert "docker" in requirement_names(importlib.metadata.requires("shiphook-swarm") or [])


def test_the_nomad_distribution_brings_python_nomad():
    assert "python-nomad" in requirement_names(importlib.metadata.requires("shiphook-nomad") or [])


def test_the_kubernetes_distribution_brings_the_official_client():
    assert "kubernetes" in requirement_names(
        importlib.metadata.requires("shiphook-kubernetes") or []
    )
