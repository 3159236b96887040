/*
 * pod-pause: PID 1 of a pod's PID namespace (vmm_task/pod/namespaces.py execs it).
 *
 *     pod-pause [FD]
 *
 * It keeps the namespace alive and reaps the orphans the kernel re-parents to it, nothing else.
 * Every signal is blocked: only SIGKILL (the agent, when the pod goes) stops it, and nothing a
 * container sends it can end the pod's PID namespace. FD, if given, is the read end of a pipe
 * whose write end the agent holds: EOF there means the agent died without killing us (dev mode
 * on a host, where the agent is not the machine's init), and we exit.
 *
 * Why not catatonit -P (Debian's package): it closes every fd >= 3, so it cannot watch such a
 * pipe, and it exits on a SIGTERM or SIGINT from any process of the pod.
 *
 * Built static (initrd/pod_pause.py), so the same file runs in the guest and on the host.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
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
		{ .fd = argc > 1 ? atoi(argv[1]) : -1, .events = POLLIN }, /* poll skips fd -1 */
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
