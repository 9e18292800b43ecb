"""The deployer: takes queued deployments to their end on the targets' backends.

`deployer` is the work itself (a dispatcher thread, leases on target slots, an `Execution` per
deployment calling the backend); `process` is the process `shiphook serve` runs it in, and the
supervisor that restarts that process if it dies. Embedded in one process with the app, as the
tests and `shiphook.server.build` do, the same `Deployer` runs in threads.

May import the shared modules of `shiphook` (config, models, storage, backends), never
`shiphook.http`: the HTTP workers reach the deployer only through the database and the wake-up
socket (`shiphook.wakeup`).
"""
