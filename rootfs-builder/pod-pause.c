/*
 * pod-pause: PID 1 of a pod's PID namespace (vmm_task/pod/namespaces.py execs it).
 *
 *     pod-pause [FD]
 *
 * It keeps the namespace alive and reaps the orphans the kernel re-parents to it, nothing else
 * (the agent gives it /dev/null as stdio; it closes every fd above 2 but FD).
 * Every signal is blocked: only SIGKILL (the agent, when the pod goes) stops it, and nothing a
 * container sends it can end the pod's PID namespace. FD, if given, is the read end of a pipe
 * whose write end the agent holds: EOF there means the agent died without killing us (dev mode
 * on a host, where the agent is not the machine's init), and we exit.
 *
 * Why not catatonit -P (Debian's package; podman's pause): it closes every fd >= 3 but its
 * signalfd, so it cannot watch such a pipe, and in pause mode it exits on a SIGTERM or SIGINT,
 * which any process of the pod may send it (blocked signals reach a namespace's init from
 * inside it). Both read in its source (v0.1.7, main()) and seen running bookworm's 0.1.7 as
 * PID 1 of `unshare -fp`.
 *
 * Built by initrd/pod_pause.py with the host's compiler against the host's libc, which the image
 * carries for the agent: the same file runs in the guest and on the host (dev mode).
 */
#define _GNU_SOURCE /* close_range */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int alive = argc > 1 ? atoi(argv[1]) : -1;
	/* fds the agent's own parent let it inherit (dev mode): not ours to keep open */
	close_range(alive < 3 ? 3 : alive + 1, ~0U, 0);
	sigset_t all, chld;
	sigfillset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);
	signal(SIGCHLD, SIG_DFL); /* an ignored SIGCHLD would not reach the signalfd */
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sfd < 0)
		return 1;
	struct pollfd fds[2] = {
		{ .fd = sfd, .events = POLLIN },
		{ .fd = alive, .events = POLLIN }, /* poll skips fd -1 */
	};
	for (;;) {
		/* Reap first, then wait: a SIGCHLD that comes in between stays pending on sfd. */
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
		if (poll(fds, 2, -1) < 0 && errno != EINTR)
			return 1;
		if (fds[1].revents)
			return 0; /* nothing writes the pipe: any event is EOF, the agent is gone */
		struct signalfd_siginfo info;
		while (read(sfd, &info, sizeof(info)) == sizeof(info))
			;
	}
}
