#!/bin/sh
# srun --task-prolog of ft_on_pytriton.sbatch: give each task a TMPDIR of its own, so that
# task_epilog.sh can remove what the task leaves there (PyTriton's workspace, about 22 MB) even
# when scancel kills it; Slurm kills ft_runner's own janitor process together with the step.
# Lines "export NAME=VALUE" on stdout go into the task's environment. Keep the path short: PyTriton
# makes AF_UNIX sockets (at most 107 bytes) a few levels below it.
dir=${TMPDIR:-/tmp}/ft_on_pytriton.$SLURM_JOB_ID.$SLURM_STEP_ID.$SLURM_PROCID
mkdir -p "$dir" && echo "export TMPDIR=$dir"
