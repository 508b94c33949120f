"""The fleet: many devices together. Registration, probing, inventories, the choice of devices for a run, leases (one Ray actor per device) and their measurement cache."""
