"""The long-running process: CLI, lifecycle, watcher, worker, scheduler, metrics."""
