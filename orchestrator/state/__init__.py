"""What a run keeps on disk: the run store, the state folder, the cache limit, hashing, run files."""
