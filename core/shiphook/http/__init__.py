"""What runs in an HTTP worker process of `shiphook serve` (uvicorn calls `worker.worker_app`).

`app` is the Falcon API (resources, error mapping); `connections` the HTTP protocol with its
limits; `waiters` holds `?wait` callers until their deployment ends; `notifier` wakes the
deployer process after each commit. A hook request's deployment is committed by the accept path
(`shiphook.fastpath.GroupCommit`) in a database thread, so that the event loop never waits for
the database.

May import the shared modules of `shiphook` (config, models, storage, services, plugin API),
never `shiphook.deployer`: the deployer runs in a process of its own.
"""
