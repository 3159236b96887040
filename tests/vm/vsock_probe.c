/* Test-only guest program: connect to vsock ports from inside the guest, as a container that may
 * open AF_VSOCK would, and say what happened on each. Usage: vsock_probe PORT...
 * For each port, to the loopback cid (1) and to the guest's own cid, one line:
 *   "cid C port P: connect failed: <error>" | "closed" (the peer closed at once) | "open"
 *   (still open after 2 s: served) | "data" (the peer sent something).
 * Built with `gcc -static` by tests/vm/test_guest_peers.py. */
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static unsigned local_cid(void) {
    unsigned cid = 0;
    int fd = open("/dev/vsock", O_RDONLY);
    if (fd < 0 || ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0) {
        printf("local cid: %s\n", strerror(errno));
        exit(2);
    }
    close(fd);
    return cid;
}

static const char *probe(unsigned cid, unsigned port, char *why, size_t size) {
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        snprintf(why, size, "connect failed: %s", strerror(errno));
        if (s >= 0) close(s);
        return why;
    }
    struct pollfd p = { .fd = s, .events = POLLIN };
    const char *result = "open";
    if (poll(&p, 1, 2000) > 0) {
        char byte;
        result = read(s, &byte, 1) > 0 ? "data" : "closed";
    }
    close(s);
    return result;
}

int main(int argc, char **argv) {
    unsigned cids[2] = { 1, local_cid() };
    char why[128];
    for (int i = 1; i < argc; i++)
        for (int c = 0; c < 2; c++) {
            unsigned port = (unsigned)strtoul(argv[i], NULL, 10);
            printf("cid %u port %u: %s\n", cids[c], port, probe(cids[c], port, why, sizeof why));
        }
    return 0;
}
