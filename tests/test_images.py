import pytest
from pydantic import BaseModel, ValidationError
from shiphook import ImageRepository, repository_of, tag_of
from shiphook.images import normalised


@pytest.mark.parametrize(
    ("image", "repository", "tag"),
    [
        ("web", "web", None),
        ("web:1.2", "web", "1.2"),
        ("registry:5000/team/web", "registry:5000/team/web", None),
        ("registry:5000/team/web:1.2@sha256:" + "a" * 64, "registry:5000/team/web", "1.2"),
        ("registry:5000/web@sha256:" + "a" * 64, "registry:5000/web", None),
    ],
)
def test_an_image_reference_splits_into_repository_and_tag(image, repository, tag):
    assert repository_of(image) == repository
    assert tag_of(image) == tag


@pytest.mark.parametrize("value", ["web:1.2", "web@sha256:" + "a" * 64, " "])
def test_an_image_repository_option_refuses_a_tag_or_digest(value):
    class Options(BaseModel):
        image: ImageRepository | None = None

    assert Options(image="registry:5000/team/web").image == "registry:5000/team/web"
    with pytest.raises(ValidationError, match="expected a repository without tag or digest"):
        Options(image=value)


@pytest.mark.parametrize(
    ("repository", "as_the_engine_reads_it"),
    [
        ("nginx", "docker.io/library/nginx"),
        ("docker.io/nginx", "docker.io/library/nginx"),
        ("index.docker.io/library/nginx", "docker.io/library/nginx"),
        ("team/web", "docker.io/team/web"),
        ("localhost/web", "localhost/web"),
        ("registry:5000/web", "registry:5000/web"),
        ("registry.test/team/web", "registry.test/team/web"),
    ],
)
def test_a_repository_is_compared_as_the_engine_reads_it(repository, as_the_engine_reads_it):
    assert normalised(repository) == as_the_engine_reads_it
