"""Pure diffusion maths: schedules, parametrisations, timestep samplers, solvers, guidance. No weights, no diffusers."""
