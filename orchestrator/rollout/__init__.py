"""Rolling a run's pick out to a profile's devices: the plan, canary waves, the device-side health check, rollback and the deployments store."""
