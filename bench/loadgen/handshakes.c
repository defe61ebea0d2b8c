/* Handshake load: K WebSocket opens in flight, each opened then closed, for T seconds.
 *
 * Each connection: TCP connect, upgrade request to ws://HOST:PORT/watch/NAME with the
 * streamrelay.v1 subprotocol, wait for the response head; on 101 send a masked close
 * frame (1000) and wait for the server to end the TCP connection (a 2 s bound); any
 * other status (503 from a rate limit) is counted as refused.  Client sockets end with
 * RST so thousands of handshakes leave no TIME_WAIT behind here.  Completions inside
 * [--window-start, --window-end) (CLOCK_REALTIME us) are counted apart for the rate.
 */
#include "ws.h"
#include <getopt.h>
#include <sys/epoll.h>

enum { H_CONNECTING, H_REQUESTED, H_CLOSING };

typedef struct {
    int fd, state, headlen;
    int64_t started;
    char head[2048];
} hs_t;

static const char *host = "127.0.0.1", *path = "/watch/bench";
static int port, ep;
static uint64_t rng = 0xA0761D6478BD642FULL;
static long long ok, refused, errors, close_timeouts, win_ok, win_refused, statuses[6];
static long long win_start, win_end;

static void begin(hs_t *h, int i) {
    h->fd = connect_nb(host, port, 0);
    h->headlen = 0;
    h->started = mono_us();
    h->state = H_CONNECTING;
    if (h->fd < 0) { errors++; return; }
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
    epoll_ctl(ep, EPOLL_CTL_ADD, h->fd, &ev);
}

static void finish(hs_t *h, int i, int outcome) {
    if (h->fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, h->fd, NULL);
        close_abort(h->fd);
    }
    int64_t t = now_us();
    int in_win = t >= win_start && t < win_end;
    if (outcome == 1) { ok++; win_ok += in_win; }
    else if (outcome == 2) { refused++; win_refused += in_win; }
    else errors++;
    begin(h, i);
}

static void on_event(hs_t *h, int i, uint32_t events) {
    if (h->state == H_CONNECTING) {
        int err = 0; socklen_t l = sizeof err;
        getsockopt(h->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err || (events & EPOLLERR)) { finish(h, i, 0); return; }
        char req[512];
        int n = upgrade_request(req, sizeof req, host, port, path, &rng);
        if (send(h->fd, req, (size_t)n, MSG_NOSIGNAL) != n) { finish(h, i, 0); return; }
        h->state = H_REQUESTED;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_MOD, h->fd, &ev);
        return;
    }
    char buf[4096];
    ssize_t r = recv(h->fd, buf, sizeof buf, 0);
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (h->state == H_CLOSING) {
        /* Drain the server's close frame; EOF (or a reset) ends the handshake. */
        if (r <= 0) finish(h, i, 1);
        return;
    }
    if (r <= 0) { finish(h, i, 0); return; }
    size_t room = sizeof h->head - 1 - (size_t)h->headlen;
    size_t k = (size_t)r < room ? (size_t)r : room;
    memcpy(h->head + h->headlen, buf, k);
    h->headlen += (int)k;
    h->head[h->headlen] = 0;
    if (!strstr(h->head, "\r\n\r\n")) { if (!room) finish(h, i, 0); return; }
    int status = http_status(h->head);
    int cls = status / 100;
    if (cls >= 1 && cls <= 5) statuses[cls]++;
    if (status != 101) { finish(h, i, status == 503 || status == 429 ? 2 : 0); return; }
    uint8_t f[16], key[4];
    uint64_t rr = rng_next(&rng);
    memcpy(key, &rr, 4);
    uint8_t code[2] = {0x03, 0xE8};
    size_t hl = frame_header(f, 8, 2, key);
    memcpy(f + hl, code, 2);
    mask_bytes(f + hl, 2, key, 0);
    (void)!send(h->fd, f, hl + 2, MSG_NOSIGNAL);
    h->state = H_CLOSING;
    h->started = mono_us();
}

int main(int argc, char **argv) {
    int inflight = 50;
    double seconds = 5;
    static struct option opts[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"path", 1, 0, 'P'}, {"inflight", 1, 0, 'i'},
        {"seconds", 1, 0, 't'}, {"window-start", 1, 0, 'a'}, {"window-end", 1, 0, 'b'},
        {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'P': path = optarg; break;
        case 'i': inflight = atoi(optarg); break;
        case 't': seconds = atof(optarg); break;
        case 'a': win_start = atoll(optarg); break;
        case 'b': win_end = atoll(optarg); break;
        default: fprintf(stderr, "handshakes: bad option\n"); return 2;
        }
    }
    if (!port || inflight < 1) { fprintf(stderr, "handshakes: --port\n"); return 2; }
    raise_nofile();
    rng ^= (uint64_t)now_us();
    ep = epoll_create1(EPOLL_CLOEXEC);
    hs_t *hs = calloc((size_t)inflight, sizeof(hs_t));
    for (int i = 0; i < inflight; i++) begin(&hs[i], i);
    int64_t end = mono_us() + (int64_t)(seconds * 1e6);
    struct epoll_event evs[256];
    while (mono_us() < end) {
        int n = epoll_wait(ep, evs, 256, 50);
        for (int k = 0; k < n; k++) {
            int i = (int)evs[k].data.u32;
            on_event(&hs[i], i, evs[k].events);
        }
        int64_t t = mono_us();
        for (int i = 0; i < inflight; i++) {
            if (hs[i].fd < 0) { begin(&hs[i], i); continue; }
            if (t - hs[i].started > 2000000) {
                if (hs[i].state == H_CLOSING) { close_timeouts++; finish(&hs[i], i, 1); }
                else finish(&hs[i], i, 0);
            }
        }
    }
    printf("{\"event\":\"final\",\"ok\":%lld,\"refused\":%lld,\"errors\":%lld,"
           "\"close_timeouts\":%lld,\"win_ok\":%lld,\"win_refused\":%lld,\"s2xx\":%lld,"
           "\"s4xx\":%lld,\"s5xx\":%lld,\"cpu_s\":%.4f}\n",
           ok, refused, errors, close_timeouts, win_ok, win_refused, statuses[2], statuses[4],
           statuses[5], cpu_seconds());
    return 0;
}
