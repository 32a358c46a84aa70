"""The pure, synchronous library: no threads, no signals, no logging set-up, no globals."""
