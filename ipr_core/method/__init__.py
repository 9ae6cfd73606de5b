"""IPR's algorithm over plain data: expert trajectories (`expert`), exploration
(`explore`), step rewards by Monte Carlo or a step reward model (`step_rewards`), pair mining
(`mining`) and evaluation (`evaluate`)."""
