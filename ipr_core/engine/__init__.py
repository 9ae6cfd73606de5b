"""Running a policy: backends that complete conversations (`backends/`), the lock-step
rollout engine that plays them against environments (`rollout`), the models they load
(`models`) and a progress bar for long batches (`progress`)."""
