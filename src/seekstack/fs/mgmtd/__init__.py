"""The cluster manager: membership, heartbeats and leases, chain tables and target states, routing for clients."""
