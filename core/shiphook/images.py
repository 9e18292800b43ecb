"""Image references, as every backend reads them: `registry:5000/team/web:1.2@sha256:...`."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def repository_of(image: str) -> str:
    """`registry:5000/team/web:1.2@sha256:...` -> `registry:5000/team/web`."""
    name = image.split("@", 1)[0]
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        name = name[:colon]
    return name


def normalised(repository: str) -> str:
    """A repository as the Docker Engine reads it (distribution/reference's normalised name):
    `nginx` and `index.docker.io/library/nginx` are `docker.io/library/nginx`."""
    domain, slash, rest = repository.partition("/")
    if not slash or ("." not in domain and ":" not in domain and domain != "localhost"):
        domain, rest = "docker.io", repository
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in rest:
        rest = f"library/{rest}"
    return f"{domain}/{rest}"


def tag_of(image: str | None) -> str | None:
    """`registry:5000/team/web:1.2@sha256:...` -> `1.2`; None when the reference has no tag."""
    if not image:
        return None
    name = image.split("@", 1)[0]
    colon = name.rfind(":")
    return name[colon + 1 :] if colon > name.rfind("/") else None


def _is_a_repository(value: str) -> str:
    if not value.strip() or repository_of(value) != value:
        raise ValueError(
            "expected a repository without tag or digest, e.g. registry.example.com/web "
            "(the tag comes from each hook call)"
        )
    return value


ImageRepository = Annotated[str, AfterValidator(_is_a_repository)]
"""A target option naming the repository to deploy from (the tag comes from each hook call)."""
