/* Test-only guest program: what a root in the guest can do to the host's vsock with the guest
 * kernel's own driver (it cannot forge virtqueue descriptors: tests/unit/test_vsock_backend_hostile.py
 * plays a hostile kernel against the real backend process). Built `gcc -static` by
 * tests/vm/test_hostile_guest.py. Each mode prints one line of counts:
 *   flood COUNT        blocking connects to the host (cid 2), ports 1024.. in turn, one after the
 *                      other: "flood N in MS ms: reset R refused F timedout T connected C other O"
 *   storm ROUNDS WIDTH each round opens WIDTH connects at once (non-blocking) and closes them
 *                      unanswered (each close makes the guest send RST):
 *                      "storm RxW in MS ms: pending P failed F", then one blocking connect:
 *                      "after: <how it ended>" (the host still answers at once) */
#include <errno.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HOST_CID 2
#define FIRST_PORT 1024
#define PORTS 1000
#define CONNECT_TIMEOUT_S 5

static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int vsock(int flags) {
    int s = socket(AF_VSOCK, SOCK_STREAM | flags, 0);
    if (s < 0) {
        printf("socket: %s\n", strerror(errno));
        exit(2);
    }
    struct timeval timeout = { .tv_sec = CONNECT_TIMEOUT_S };
    setsockopt(s, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &timeout, sizeof timeout);
    return s;
}

/* 0 if connected, else errno. */
static int connect_to(int s, unsigned port) {
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = HOST_CID, .svm_port = port };
    return connect(s, (struct sockaddr *)&a, sizeof a) == 0 ? 0 : errno;
}

static int flood(long count) {
    long reset = 0, refused = 0, timedout = 0, connected = 0, other = 0, start = now_ms();
    for (long i = 0; i < count; i++) {
        int s = vsock(0);
        switch (connect_to(s, FIRST_PORT + i % PORTS)) {
        case 0: connected++; break;
        case ECONNRESET: reset++; break;
        case ECONNREFUSED: refused++; break;
        case ETIMEDOUT: timedout++; break;
        default: other++;
        }
        close(s);
    }
    printf("flood %ld in %ld ms: reset %ld refused %ld timedout %ld connected %ld other %ld\n",
           count, now_ms() - start, reset, refused, timedout, connected, other);
    return 0;
}

static int storm(long rounds, long width) {
    int *socks = calloc(width, sizeof *socks);
    long pending = 0, failed = 0, start = now_ms();
    for (long r = 0; r < rounds; r++) {
        for (long i = 0; i < width; i++) {
            socks[i] = vsock(SOCK_NONBLOCK);
            int e = connect_to(socks[i], FIRST_PORT + (r * width + i) % PORTS);
            if (e == EINPROGRESS) pending++; else failed++;
        }
        for (long i = 0; i < width; i++)
            close(socks[i]);
    }
    printf("storm %ldx%ld in %ld ms: pending %ld failed %ld\n", rounds, width, now_ms() - start, pending, failed);
    int s = vsock(0);
    long before = now_ms();
    int e = connect_to(s, FIRST_PORT);
    printf("after: %s in %ld ms\n", e ? strerror(e) : "connected", now_ms() - before);
    close(s);
    free(socks);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "flood") == 0)
        return flood(atol(argv[2]));
    if (argc == 4 && strcmp(argv[1], "storm") == 0)
        return storm(atol(argv[2]), atol(argv[3]));
    fprintf(stderr, "usage: hostile_vsock flood COUNT | storm ROUNDS WIDTH\n");
    return 2;
}
