"""Ray Train trainers: thin assemblies over cxr_ray.training."""
