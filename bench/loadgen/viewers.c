/* N WebSocket viewers on one epoll loop: the load generator's receiving side.
 *
 * Each viewer opens ws://HOST:PORT/watch/NAME[-k] offering the streamrelay.v1
 * subprotocol, then parses only frame headers and, of each binary message, the first 9
 * payload bytes (flags + big-endian capture time in microseconds).  Latency is
 * CLOCK_REALTIME at the message's last byte minus its capture time (one host clock).
 *
 * Driven by lines on stdin:
 *   window START_US END_US   reset the window counters (times are CLOCK_REALTIME us)
 *   report                   print the counters as one JSON line
 *   reconnect                close every viewer and open it again at once (reload storm)
 *   stop                     print the counters and exit (EOF on stdin does the same)
 * Prints {"event":"ready",...} once every viewer has either upgraded or failed.
 * Bounded: exits by itself after --max-seconds.
 */
#include "ws.h"
#include <getopt.h>
#include <sys/epoll.h>

#define HIST_BUCKET_US 10
#define HIST_BUCKETS 1000000 /* 10 s */
#define SCRATCH (256 * 1024)

enum { C_IDLE, C_CONNECTING, C_REQUESTED, C_OPEN, C_DEAD };

typedef struct {
    int fd, state, stream, slow;
    char head[4096];
    int headlen;
    uint8_t fh[14];
    int fhlen, fhneed;
    uint64_t remain;
    int opcode, fin, msg_binary;
    uint8_t cap[9];
    int caplen;
    uint8_t ctl[126];
    int ctllen;
    uint64_t win_cap; /* binary messages with capture time in the window */
    int64_t last_arrival;
    int awaiting_back, attempts;
} conn_t;

static const char *host = "127.0.0.1";
static int port, count = 1, streams = 1, inflight_cap = 64, slow_count = 0, rcvbuf = 0;
static const char *prefix = "/watch/", *name = "bench";
static double max_seconds = 600;
static conn_t *conns;
static int ep, inflight, resolved, failed, upgraded, closed_by_server, ready_sent;
static int *queue, qhead, qtail;
static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static int64_t win_start, win_end, reconnect_at;
static uint64_t win_arrival_msgs, win_arrival_bytes, total_msgs, lat_n, back, retries;
static int64_t lat_max, max_gap, back_max;
static uint32_t *hist;
static uint8_t scratch[SCRATCH];

static void enqueue(int i) { queue[qtail++ % count] = i; }

static void start_connect(int i) {
    conn_t *c = &conns[i];
    c->fd = connect_nb(host, port, c->slow ? 4096 : rcvbuf);
    if (c->fd < 0) {
        if (c->awaiting_back && c->attempts < 20) { c->attempts++; retries++; enqueue(i); return; }
        failed++; resolved++; c->state = C_DEAD; return;
    }
    c->state = C_CONNECTING;
    c->headlen = 0; c->fhlen = 0; c->fhneed = 2; c->remain = 0; c->caplen = 0; c->ctllen = 0;
    inflight++;
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

static void pump_connects(void) {
    while (inflight < inflight_cap && qhead < qtail) start_connect(queue[qhead++ % count]);
}

static void kill_conn(conn_t *c, int by_server) {
    if (c->state == C_DEAD || c->state == C_IDLE) return;
    int opening = c->state == C_CONNECTING || c->state == C_REQUESTED;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = C_DEAD;
    if (opening) {
        inflight--;
        /* In a reload storm a failed open is tried again, as a player would (bounded). */
        if (c->awaiting_back && c->attempts < 20) {
            c->attempts++;
            retries++;
            c->state = C_IDLE;
            enqueue((int)(c - conns));
            return;
        }
        failed++;
        resolved++;
    } else {
        upgraded--;
        if (by_server) closed_by_server++;
    }
}

static void send_ctl(conn_t *c, int opcode, const uint8_t *p, int n) {
    uint8_t f[140], key[4];
    uint64_t r = rng_next(&rng);
    memcpy(key, &r, 4);
    size_t h = frame_header(f, opcode, (uint64_t)n, key);
    memcpy(f + h, p, (size_t)n);
    mask_bytes(f + h, (size_t)n, key, 0);
    (void)!send(c->fd, f, h + (size_t)n, MSG_NOSIGNAL);
}

static void message_done(conn_t *c) {
    if (!c->msg_binary || c->caplen < 9) return;
    int64_t t = now_us();
    int64_t cap = (int64_t)be64(c->cap + 1);
    total_msgs++;
    if (c->awaiting_back) {
        c->awaiting_back = 0;
        back++;
        if (t - reconnect_at > back_max) back_max = t - reconnect_at;
    }
    if (win_end && t >= win_start && t < win_end) {
        win_arrival_msgs++;
        if (c->last_arrival >= win_start && t - c->last_arrival > max_gap) max_gap = t - c->last_arrival;
    }
    c->last_arrival = t;
    if (win_end && cap >= win_start && cap < win_end) {
        c->win_cap++;
        int64_t lat = t - cap;
        if (lat < 0) lat = 0;
        if (lat > lat_max) lat_max = lat;
        int64_t b = lat / HIST_BUCKET_US;
        hist[b < HIST_BUCKETS ? b : HIST_BUCKETS - 1]++;
        lat_n++;
    }
}

/* Parse received bytes: frame headers, 9 bytes of each binary message, control frames. */
static void parse(conn_t *c, const uint8_t *p, size_t n) {
    if (win_end) {
        int64_t t = now_us();
        if (t >= win_start && t < win_end) win_arrival_bytes += n;
    }
    while (n) {
        if (c->fhlen < c->fhneed) {
            c->fh[c->fhlen++] = *p++; n--;
            if (c->fhlen == 2) {
                int l7 = c->fh[1] & 0x7f;
                c->fhneed = 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + ((c->fh[1] & 0x80) ? 4 : 0);
            }
            if (c->fhlen < c->fhneed) continue;
            int l7 = c->fh[1] & 0x7f;
            c->remain = l7 < 126 ? (uint64_t)l7
                        : l7 == 126 ? (uint64_t)c->fh[2] << 8 | c->fh[3] : be64(c->fh + 2);
            c->opcode = c->fh[0] & 0x0f;
            c->fin = c->fh[0] & 0x80;
            if (c->opcode >= 8) c->ctllen = 0;
            else if (c->opcode != 0) { c->msg_binary = c->opcode == 2; c->caplen = 0; }
        } else {
            size_t take = c->remain < n ? (size_t)c->remain : n;
            if (c->opcode >= 8) {
                size_t room = sizeof c->ctl - (size_t)c->ctllen;
                size_t k = take < room ? take : room;
                memcpy(c->ctl + c->ctllen, p, k); c->ctllen += (int)k;
            } else if (c->msg_binary && c->caplen < 9) {
                size_t k = take < (size_t)(9 - c->caplen) ? take : (size_t)(9 - c->caplen);
                memcpy(c->cap + c->caplen, p, k); c->caplen += (int)k;
            }
            p += take; n -= take; c->remain -= take;
        }
        if (c->fhlen == c->fhneed && c->remain == 0) {
            if (c->opcode == 9) send_ctl(c, 10, c->ctl, c->ctllen);
            else if (c->opcode == 8) { send_ctl(c, 8, c->ctl, c->ctllen > 2 ? 2 : c->ctllen); kill_conn(c, 1); return; }
            else if (c->opcode < 8 && c->fin) message_done(c);
            c->fhlen = 0; c->fhneed = 2;
        }
    }
}

static void maybe_ready(void) {
    if (!ready_sent && resolved >= count) {
        ready_sent = 1;
        printf("{\"event\":\"ready\",\"upgraded\":%d,\"failed\":%d}\n", upgraded, failed);
        fflush(stdout);
    }
}

static void on_event(int i, uint32_t events) {
    conn_t *c = &conns[i];
    if (c->state == C_CONNECTING) {
        int err = 0; socklen_t l = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err || (events & (EPOLLERR | EPOLLHUP))) { kill_conn(c, 0); return; }
        char req[512];
        char path[256];
        if (streams > 1) snprintf(path, sizeof path, "%s%s-%d", prefix, name, c->stream);
        else snprintf(path, sizeof path, "%s%s", prefix, name);
        int n = upgrade_request(req, sizeof req, host, port, path, &rng);
        if (send(c->fd, req, (size_t)n, MSG_NOSIGNAL) != n) { kill_conn(c, 0); return; }
        c->state = C_REQUESTED;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        return;
    }
    if (c->state == C_REQUESTED) {
        ssize_t r = recv(c->fd, c->head + c->headlen, sizeof c->head - 1 - (size_t)c->headlen, 0);
        if (r <= 0) { if (r < 0 && errno == EAGAIN) return; kill_conn(c, 0); return; }
        c->headlen += (int)r;
        c->head[c->headlen] = 0;
        char *end = strstr(c->head, "\r\n\r\n");
        if (!end) { if (c->headlen >= (int)sizeof c->head - 1) kill_conn(c, 0); return; }
        if (http_status(c->head) != 101) { kill_conn(c, 0); return; }
        inflight--; resolved++; upgraded++;
        c->state = C_OPEN;
        size_t used = (size_t)(end + 4 - c->head);
        if (c->slow) {
            /* A viewer that stops reading: its socket stays open, nothing is read again. */
            struct epoll_event ev = {.events = 0, .data.u32 = (uint32_t)i};
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
            return;
        }
        if ((size_t)c->headlen > used) parse(c, (uint8_t *)c->head + used, (size_t)c->headlen - used);
        return;
    }
    if (c->state == C_OPEN) {
        for (int rounds = 0; rounds < 4 && c->state == C_OPEN; rounds++) {
            ssize_t r = recv(c->fd, scratch, SCRATCH, 0);
            if (r < 0) { if (errno != EAGAIN && errno != EINTR) kill_conn(c, 1); return; }
            if (r == 0) { kill_conn(c, 1); return; }
            parse(c, scratch, (size_t)r);
            if (r < SCRATCH) return;
        }
    }
}

static int64_t percentile(double q) {
    if (!lat_n) return -1;
    uint64_t want = (uint64_t)(q * (double)lat_n);
    if (want >= lat_n) want = lat_n - 1;
    uint64_t seen = 0;
    for (int b = 0; b < HIST_BUCKETS; b++) {
        seen += hist[b];
        if (seen > want) return (int64_t)b * HIST_BUCKET_US + HIST_BUCKET_US / 2;
    }
    return lat_max;
}

static void report(const char *event) {
    uint64_t mn = UINT64_MAX, mx = 0, sum = 0;
    int fast = 0;
    for (int i = 0; i < count; i++) {
        if (conns[i].slow) continue;
        fast++;
        uint64_t v = conns[i].win_cap;
        sum += v;
        if (v < mn) mn = v;
        if (v > mx) mx = v;
    }
    if (!fast) mn = 0;
    printf("{\"event\":\"%s\",\"count\":%d,\"upgraded\":%d,\"failed\":%d,\"closed_by_server\":%d,"
           "\"win_capture_msgs\":%llu,\"win_capture_min\":%llu,\"win_capture_max\":%llu,"
           "\"win_arrival_msgs\":%llu,\"win_arrival_bytes\":%llu,\"total_msgs\":%llu,"
           "\"lat_n\":%llu,\"lat_p50_us\":%lld,\"lat_p99_us\":%lld,\"lat_max_us\":%lld,"
           "\"max_gap_us\":%lld,\"back\":%llu,\"back_max_us\":%lld,\"retries\":%llu,"
           "\"cpu_s\":%.4f}\n",
           event, count, upgraded, failed, closed_by_server, (unsigned long long)sum,
           (unsigned long long)mn, (unsigned long long)mx, (unsigned long long)win_arrival_msgs,
           (unsigned long long)win_arrival_bytes, (unsigned long long)total_msgs,
           (unsigned long long)lat_n, (long long)percentile(0.5), (long long)percentile(0.99),
           (long long)lat_max, (long long)max_gap, (unsigned long long)back, (long long)back_max,
           (unsigned long long)retries, cpu_seconds());
    fflush(stdout);
}

static void reconnect_all(void) {
    reconnect_at = now_us();
    inflight_cap = count; /* a reload storm: everyone at once */
    back = 0; back_max = 0; retries = 0;
    resolved = 0; failed = 0; ready_sent = 0;
    qhead = qtail = 0;
    for (int i = 0; i < count; i++) {
        conn_t *c = &conns[i];
        if (c->state != C_DEAD && c->state != C_IDLE) {
            if (c->state == C_OPEN) upgraded--;
            else inflight--;
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close_abort(c->fd);
        }
        c->state = C_IDLE;
        c->awaiting_back = 1;
        c->attempts = 0;
        enqueue(i);
    }
    pump_connects();
}

/* Returns 1 to stop. */
static int command(char *line) {
    long long a, b;
    if (sscanf(line, "window %lld %lld", &a, &b) == 2) {
        win_start = a; win_end = b;
        win_arrival_msgs = win_arrival_bytes = lat_n = 0;
        lat_max = max_gap = 0;
        memset(hist, 0, sizeof(uint32_t) * HIST_BUCKETS);
        for (int i = 0; i < count; i++) conns[i].win_cap = 0;
    } else if (!strncmp(line, "report", 6)) {
        report("report");
    } else if (!strncmp(line, "reconnect", 9)) {
        reconnect_all();
    } else if (!strncmp(line, "stop", 4)) {
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    static struct option opts[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"prefix", 1, 0, 'P'}, {"name", 1, 0, 'n'},
        {"count", 1, 0, 'c'}, {"streams", 1, 0, 's'}, {"inflight", 1, 0, 'i'},
        {"slow", 1, 0, 'S'}, {"rcvbuf", 1, 0, 'r'}, {"max-seconds", 1, 0, 'm'}, {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'P': prefix = optarg; break;
        case 'n': name = optarg; break;
        case 'c': count = atoi(optarg); break;
        case 's': streams = atoi(optarg); break;
        case 'i': inflight_cap = atoi(optarg); break;
        case 'S': slow_count = atoi(optarg); break;
        case 'r': rcvbuf = atoi(optarg); break;
        case 'm': max_seconds = atof(optarg); break;
        default: fprintf(stderr, "viewers: bad option\n"); return 2;
        }
    }
    if (!port || count < 1 || streams < 1) { fprintf(stderr, "viewers: --port and --count\n"); return 2; }
    raise_nofile();
    rng ^= (uint64_t)now_us() ^ (uint64_t)getpid() << 32;
    conns = calloc((size_t)count, sizeof(conn_t));
    queue = calloc((size_t)count, sizeof(int));
    hist = calloc(HIST_BUCKETS, sizeof(uint32_t));
    ep = epoll_create1(EPOLL_CLOEXEC);
    set_nonblock(0);
    struct epoll_event sev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev);
    for (int i = 0; i < count; i++) {
        conns[i].stream = i % streams;
        conns[i].slow = i < slow_count;
        enqueue(i);
    }
    pump_connects();
    int64_t deadline = mono_us() + (int64_t)(max_seconds * 1e6);
    struct epoll_event evs[256];
    char line[256];
    size_t linelen = 0;
    int stop = 0;
    while (!stop && mono_us() < deadline) {
        int n = epoll_wait(ep, evs, 256, 100);
        for (int k = 0; k < n && !stop; k++) {
            if (evs[k].data.u32 == UINT32_MAX) {
                ssize_t r = read(0, line + linelen, sizeof line - 1 - linelen);
                if (r == 0) { stop = 1; break; }
                if (r < 0) continue;
                linelen += (size_t)r;
                line[linelen] = 0;
                char *nl;
                while (!stop && (nl = strchr(line, '\n'))) {
                    *nl = 0;
                    stop = command(line);
                    size_t rest = linelen - (size_t)(nl + 1 - line);
                    memmove(line, nl + 1, rest);
                    linelen = rest;
                    line[linelen] = 0;
                }
                if (linelen >= sizeof line - 1) linelen = 0;
                continue;
            }
            on_event((int)evs[k].data.u32, evs[k].events);
        }
        pump_connects();
        maybe_ready();
    }
    report("final");
    return 0;
}
