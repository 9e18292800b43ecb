"""The framework's limit: a bare Falcon ASGI app that parses the hook's JSON and answers 201.

Served like `shiphook serve` (uvicorn, uvloop, httptools, one process) by bench/common.py.
"""

import json

import falcon
import falcon.asgi


class Hook:
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = json.loads(await req.bounded_stream.read())
        resp.status = falcon.HTTP_201
        resp.media = {"deployment": {"imageTag": body["imageTag"]}}


class Health:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = {"status": "ok"}


app = falcon.asgi.App()
app.add_route("/api/v1/dh", Hook())
app.add_route("/healthz", Health())
