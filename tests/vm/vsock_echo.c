/* Test-only guest /init for the vsock transport tests and bench (tests/vm/vsock_echo_guest.py).
 *
 * Stands in for the agent: prints the launcher's ready line once it listens, then serves
 *   port 5000  echo
 *   port 5001  source: reads a u64 LE byte count, sends that many bytes of a fixed 1 MiB
 *              xorshift32 block repeated, then half-closes
 *   port 5002  sink: reads until EOF, answers the byte count as u64 LE
 * and, guest -> host, first connects to host port 6001 (nothing listens: must be refused,
 * reported on the console), then keeps trying host port 6000 and echoes on it once accepted.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BLOCK (1 << 20)
static unsigned char block[BLOCK];
static unsigned char buf[1 << 16];

static int write_all(int fd, const void *p, size_t n) {
    const unsigned char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        c += w; n -= (size_t)w;
    }
    return 0;
}

static void echo(int fd) {
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        if (write_all(fd, buf, (size_t)n)) break;
}

static void source(int fd) {
    uint64_t want = 0, off = 0;
    size_t got = 0;
    while (got < sizeof want) {
        ssize_t n = read(fd, (char *)&want + got, sizeof want - got);
        if (n <= 0) return;
        got += (size_t)n;
    }
    while (off < want) {
        size_t at = off % BLOCK, n = BLOCK - at;
        if (n > want - off) n = want - off;
        if (write_all(fd, block + at, n)) return;
        off += n;
    }
    shutdown(fd, SHUT_WR);
    while (read(fd, buf, sizeof buf) > 0) {}
}

static void sink(int fd) {
    uint64_t total = 0;
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) total += (uint64_t)n;
    write_all(fd, &total, sizeof total);
}

static int listen_on(unsigned port) {
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 64)) {
        printf("vsock-echo: listen %u: %s\n", port, strerror(errno));
        return -1;
    }
    return s;
}

static int connect_host(unsigned port) {
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port };
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) == 0) return s;
    int e = errno;
    if (s >= 0) close(s);
    errno = e;
    return -1;
}

static void serve(int s, void (*handler)(int)) {
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        if (fork() == 0) { handler(c); _exit(0); }
        close(c);
    }
}

static void guest_to_host(void) {
    int s = connect_host(6001);
    printf("vsock-echo: host port 6001 %s (errno %d)\n", s < 0 ? "refused" : "ACCEPTED", s < 0 ? errno : 0);
    fflush(stdout);
    while ((s = connect_host(6000)) < 0) usleep(100000);
    printf("vsock-echo: connected to host port 6000\n");
    fflush(stdout);
    echo(s);
}

int main(void) {
    uint32_t x = 2463534242u;
    for (size_t i = 0; i < BLOCK; i += 4) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        memcpy(block + i, &x, 4);
    }
    struct sigaction sa = { .sa_handler = SIG_IGN, .sa_flags = SA_NOCLDWAIT };
    sigaction(SIGCHLD, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int s[3] = { listen_on(5000), listen_on(5001), listen_on(5002) };
    void (*handlers[3])(int) = { echo, source, sink };
    for (int i = 0; i < 3; i++) {
        if (s[i] < 0) return 1;
        if (fork() == 0) serve(s[i], handlers[i]);
    }
    printf("vsock-echo: vmm-task ready (test guest standing in for the agent)\n");
    if (fork() == 0) { guest_to_host(); _exit(0); }
    for (;;) pause();
}
