"""The aiohttp the project declares provides what the web layer uses."""

import re
import tomllib

from aiohttp import web

from tests.nodeproc import REPO

#: The first aiohttp release with each name the web layer takes from it beyond 3.9's.
NEEDED = {"RequestKey": (3, 14)}


def test_the_declared_aiohttp_bound_provides_what_the_web_layer_uses() -> None:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [spec] = [d for d in dependencies if d.startswith("aiohttp")]
    found = re.fullmatch(r"aiohttp>=(\d+)\.(\d+)(?:\.\d+)?", spec)
    assert found, spec
    bound = (int(found.group(1)), int(found.group(2)))
    for name, since in NEEDED.items():
        assert hasattr(web, name)
        assert bound >= since, f"{spec}: web.{name} needs aiohttp {since[0]}.{since[1]}"
