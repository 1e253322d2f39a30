"""TVM backends: TIR kernels for the tile ops, schedules, Relax import and builds."""
