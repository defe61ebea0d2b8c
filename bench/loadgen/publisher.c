/* The load generator's publisher: paced media messages to ws://HOST:PORT/publish/NAME[-k].
 *
 * Each message is the v1 media header (flag byte, 8-byte big-endian capture time in
 * microseconds, CLOCK_REALTIME) and S-9 opaque bytes, sent as one masked binary frame,
 * as a client must.  A CONFIG (0x02) comes first, then frames at R per second with KEY
 * (0x01) every G frames.  Frames are scheduled on an absolute clock; if the server does
 * not read fast enough they queue here (the capture time is the scheduled one, so the
 * queueing counts as relay-added latency), and past --max-backlog bytes frames are
 * skipped and counted.  Prints one JSON line at the end.
 */
#include "ws.h"
#include <getopt.h>
#include <sys/epoll.h>

typedef struct {
    int fd;
    buf_t out;
    uint8_t fh[14];
    int fhlen, fhneed;
    uint64_t remain;
    int opcode;
    uint8_t ctl[126];
    int ctllen;
    int closed;
} pub_t;

static uint64_t rng = 0xD1B54A32D192ED03ULL;

static void send_frame(pub_t *p, int opcode, const uint8_t *data, size_t n, uint8_t *tmp) {
    uint8_t key[4];
    uint64_t r = rng_next(&rng);
    memcpy(key, &r, 4);
    uint8_t h[14];
    size_t hl = frame_header(h, opcode, n, key);
    memcpy(tmp, data, n);
    mask_bytes(tmp, n, key, 0);
    buf_append(&p->out, h, hl);
    buf_append(&p->out, tmp, n);
}

/* Handshake with a blocking socket; returns 0 on 101. */
static int open_ws(pub_t *p, const char *host, int port, const char *path) {
    p->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &sa.sin_addr);
    if (connect(p->fd, (struct sockaddr *)&sa, sizeof sa) < 0) return -1;
    set_nodelay(p->fd);
    char req[512], head[4096];
    int n = upgrade_request(req, sizeof req, host, port, path, &rng);
    if (send(p->fd, req, (size_t)n, MSG_NOSIGNAL) != n) return -1;
    int len = 0;
    /* Read byte by byte up to the blank line so no frame byte is swallowed. */
    while (len < (int)sizeof head - 1) {
        ssize_t r = recv(p->fd, head + len, 1, 0);
        if (r <= 0) return -1;
        len++;
        head[len] = 0;
        if (len >= 4 && !memcmp(head + len - 4, "\r\n\r\n", 4)) break;
    }
    if (http_status(head) != 101) {
        fprintf(stderr, "publisher: %s refused: %.60s\n", path, head);
        return -1;
    }
    set_nonblock(p->fd);
    p->fhneed = 2;
    return 0;
}

static void read_server(pub_t *p, uint8_t *tmp) {
    uint8_t buf[65536];
    for (;;) {
        ssize_t r = recv(p->fd, buf, sizeof buf, 0);
        if (r == 0) { p->closed = 1; return; }
        if (r < 0) return;
        for (ssize_t i = 0; i < r;) {
            if (p->fhlen < p->fhneed) {
                p->fh[p->fhlen++] = buf[i++];
                if (p->fhlen == 2) {
                    int l7 = p->fh[1] & 0x7f;
                    p->fhneed = 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0);
                }
                if (p->fhlen < p->fhneed) continue;
                int l7 = p->fh[1] & 0x7f;
                p->remain = l7 < 126 ? (uint64_t)l7
                            : l7 == 126 ? (uint64_t)p->fh[2] << 8 | p->fh[3] : be64(p->fh + 2);
                p->opcode = p->fh[0] & 0x0f;
                p->ctllen = 0;
            } else {
                size_t take = p->remain < (uint64_t)(r - i) ? (size_t)p->remain : (size_t)(r - i);
                if (p->opcode >= 8) {
                    size_t room = sizeof p->ctl - (size_t)p->ctllen;
                    size_t k = take < room ? take : room;
                    memcpy(p->ctl + p->ctllen, buf + i, k);
                    p->ctllen += (int)k;
                }
                i += (ssize_t)take;
                p->remain -= take;
            }
            if (p->fhlen == p->fhneed && p->remain == 0) {
                if (p->opcode == 9) send_frame(p, 10, p->ctl, (size_t)p->ctllen, tmp);
                if (p->opcode == 8) { p->closed = 1; return; }
                p->fhlen = 0;
                p->fhneed = 2;
            }
        }
    }
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *prefix = "/publish/", *name = "bench";
    int port = 0, streams = 1, gop = 30;
    long size = 20000;
    double fps = 30, seconds = 5;
    long long win_start = 0, win_end = 0;
    long max_backlog = 64L << 20;
    static struct option opts[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"prefix", 1, 0, 'P'}, {"name", 1, 0, 'n'},
        {"streams", 1, 0, 's'}, {"size", 1, 0, 'z'}, {"fps", 1, 0, 'f'}, {"gop", 1, 0, 'g'},
        {"seconds", 1, 0, 't'}, {"window-start", 1, 0, 'a'}, {"window-end", 1, 0, 'b'},
        {"max-backlog", 1, 0, 'B'}, {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'P': prefix = optarg; break;
        case 'n': name = optarg; break;
        case 's': streams = atoi(optarg); break;
        case 'z': size = atol(optarg); break;
        case 'f': fps = atof(optarg); break;
        case 'g': gop = atoi(optarg); break;
        case 't': seconds = atof(optarg); break;
        case 'a': win_start = atoll(optarg); break;
        case 'b': win_end = atoll(optarg); break;
        case 'B': max_backlog = atol(optarg); break;
        default: fprintf(stderr, "publisher: bad option\n"); return 2;
        }
    }
    if (!port || size < 9 || fps <= 0 || streams < 1 || gop < 1) {
        fprintf(stderr, "publisher: bad arguments\n");
        return 2;
    }
    rng ^= (uint64_t)now_us() ^ (uint64_t)getpid() << 32;
    pub_t *pubs = calloc((size_t)streams, sizeof(pub_t));
    uint8_t *msg = malloc((size_t)size), *tmp = malloc((size_t)size + 256);
    for (long i = 9; i < size; i++) msg[i] = (uint8_t)rng_next(&rng);
    for (int s = 0; s < streams; s++) {
        char path[256];
        if (streams > 1) snprintf(path, sizeof path, "%s%s-%d", prefix, name, s);
        else snprintf(path, sizeof path, "%s%s", prefix, name);
        if (open_ws(&pubs[s], host, port, path) < 0) {
            fprintf(stderr, "publisher: cannot open %s\n", path);
            printf("{\"event\":\"final\",\"error\":\"handshake\"}\n");
            return 1;
        }
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (int s = 0; s < streams; s++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)s};
        epoll_ctl(ep, EPOLL_CTL_ADD, pubs[s].fd, &ev);
    }
    int64_t t0 = now_us(), end = t0 + (int64_t)(seconds * 1e6);
    double period = 1e6 / fps;
    long long frame = 0, sent = 0, skipped = 0, win_sent = 0, late = 0;
    size_t max_pending = 0;
    /* CONFIG first, as a real publisher sends it before its first KEY. */
    for (int s = 0; s < streams; s++) {
        msg[0] = 0x02;
        uint64_t t = (uint64_t)now_us();
        for (int i = 0; i < 8; i++) msg[1 + i] = (uint8_t)(t >> (56 - 8 * i));
        send_frame(&pubs[s], 2, msg, 64 < size ? 64 : (size_t)size, tmp);
    }
    struct epoll_event evs[64];
    for (;;) {
        int64_t now = now_us();
        if (now >= end) break;
        int64_t due = t0 + (int64_t)((double)frame * period);
        if (now >= due) {
            if (now - due > (int64_t)period) late++;
            uint64_t cap = (uint64_t)due;
            msg[0] = frame % gop == 0 ? 0x01 : 0x00;
            for (int i = 0; i < 8; i++) msg[1 + i] = (uint8_t)(cap >> (56 - 8 * i));
            for (int s = 0; s < streams; s++) {
                if ((long)buf_pending(&pubs[s].out) > max_backlog) { skipped++; continue; }
                send_frame(&pubs[s], 2, msg, (size_t)size, tmp);
                sent++;
                if ((long long)cap >= win_start && (long long)cap < win_end) win_sent++;
            }
            frame++;
        }
        int want_out = 0;
        for (int s = 0; s < streams; s++) {
            pub_t *p = &pubs[s];
            if (p->closed) continue;
            if (buf_flush(&p->out, p->fd) < 0) p->closed = 1;
            size_t pend = buf_pending(&p->out);
            if (pend > max_pending) max_pending = pend;
            int w = pend > 0;
            want_out |= w;
            struct epoll_event ev = {.events = EPOLLIN | (w ? EPOLLOUT : 0), .data.u32 = (uint32_t)s};
            epoll_ctl(ep, EPOLL_CTL_MOD, p->fd, &ev);
        }
        int64_t next = t0 + (int64_t)((double)frame * period);
        int64_t wait_us = next - now_us();
        int timeout = wait_us <= 0 ? 0 : (int)((wait_us + 999) / 1000);
        if (timeout > 50) timeout = 50;
        /* Sub-millisecond pacing: sleep the rest precisely when nothing is pending. */
        if (!want_out && wait_us > 0 && wait_us < 1000) {
            struct timespec ts = {0, (long)wait_us * 1000};
            nanosleep(&ts, NULL);
            timeout = 0;
        }
        int n = epoll_wait(ep, evs, 64, timeout);
        for (int k = 0; k < n; k++) {
            pub_t *p = &pubs[evs[k].data.u32];
            if (evs[k].events & EPOLLIN) read_server(p, tmp);
        }
        int alive = 0;
        for (int s = 0; s < streams; s++) alive += !pubs[s].closed;
        if (!alive) break;
    }
    int closed = 0;
    for (int s = 0; s < streams; s++) closed += pubs[s].closed;
    /* Close without waiting: the harness stops the server right after. */
    for (int s = 0; s < streams; s++) close_abort(pubs[s].fd);
    printf("{\"event\":\"final\",\"frames\":%lld,\"sent\":%lld,\"win_sent\":%lld,\"skipped\":%lld,"
           "\"late\":%lld,\"max_pending\":%zu,\"closed_by_server\":%d,\"cpu_s\":%.4f}\n",
           frame, sent, win_sent, skipped, late, max_pending, closed, cpu_seconds());
    return 0;
}
