"""The diffusion process of IDM: schedules, noise draws, the training loss, what the
denoiser predicts and denoises, and the samplers (one signature, k-diffusion style)."""
