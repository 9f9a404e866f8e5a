/* LD_PRELOAD for the srun that starts the ranks (launch/slurm/pretrain.sbatch builds it).
 *
 * srun answers a SIGTERM it receives itself by killing its step at once ("srun: forcing job
 * termination", a SIGKILL to every task), and `scancel --full`, a job cancel and the time limit
 * send SIGTERM to the batch script and all its children, srun included: the ranks would die
 * before they can save. srun takes its signals with sigwait() in one thread, all of them blocked
 * elsewhere; this sigwait() leaves SIGTERM out of the set, so a SIGTERM to srun stays pending and
 * does nothing. The batch script traps SIGTERM and asks the ranks to save and stop; SLURM's own
 * SIGKILL (after KillWait) still ends everything. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>

int sigwait(const sigset_t *set, int *sig) {
    static int (*real_sigwait)(const sigset_t *, int *);
    sigset_t without_term = *set;
    if (!real_sigwait)
        real_sigwait = (int (*)(const sigset_t *, int *))dlsym(RTLD_NEXT, "sigwait");
    sigdelset(&without_term, SIGTERM);
    return real_sigwait(&without_term, sig);
}
