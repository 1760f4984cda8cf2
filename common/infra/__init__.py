"""What lorafleet stands on: the broker (Redis, Sentinel, embedded), object storage, retries, the address-checking fetch."""
