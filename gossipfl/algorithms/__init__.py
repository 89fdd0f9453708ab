"""The algorithm core: every rule written once over stacked tensors and called by every runtime.

No sockets and no files here: a runtime decides how vectors travel and in what order things run."""
