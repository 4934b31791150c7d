"""Ray actors: extraction workers, datastore shards and their router."""
