"""The download engine: the aria2c process, its JSON-RPC, notifications, the poller, and the
mapping of aria2's view onto download rows. aria2 only: uploads and media live in `uploads/`."""
