#!/bin/sh
# srun --task-epilog of ft_on_pytriton.sbatch: slurmstepd runs it after each task ends, also after
# scancel's SIGKILL; it removes the TMPDIR that task_prolog.sh made (the same path, computed again:
# the epilog sees the step's environment, not the task's).
rm -rf "${TMPDIR:-/tmp}/ft_on_pytriton.$SLURM_JOB_ID.$SLURM_STEP_ID.$SLURM_PROCID"
