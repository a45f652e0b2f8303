"""Networks: the only place that imports diffusers model classes."""
