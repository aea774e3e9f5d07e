"""`madlens monitor fit | score | show`: fit a monitor on trusted traffic, score new inputs."""
