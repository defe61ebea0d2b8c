/* The floor: a WebSocket relay in C that frames each publisher message once and writes
 * the same bytes to every viewer's socket with epoll.  What any relay must at least do
 * (read and unmask the publisher's frames, write N copies into the kernel) and nothing
 * more: no cache, no logging, no compression.
 *
 * Same URL shapes as the other peers: /publish/NAME (publisher), /watch/NAME (viewers);
 * echoes the streamrelay.v1 subprotocol.  A viewer whose queue passes 8 MiB loses new
 * messages rather than growing without bound.  Usage: floor PORT [MAX_SECONDS]
 * (it exits by itself after MAX_SECONDS, 7200 by default).
 */
#include "../loadgen/ws.h"
#include <signal.h>
#include <strings.h>
#include <sys/epoll.h>

#define MAX_FD 65536
#define MAX_STREAMS 256
#define VIEWER_QUEUE_LIMIT (8u << 20)
#define HEADROOM 10

typedef struct msg {
    int refs;
    size_t start, len, cap; /* frame bytes are data[start .. start+len) */
    uint8_t data[];
} msg_t;

typedef struct qnode {
    msg_t *m;
    struct qnode *next;
} qnode_t;

enum { R_HANDSHAKE, R_PUBLISHER, R_VIEWER };

typedef struct {
    int fd, role, stream, slot, closing, want_out;
    char head[8192];
    int headlen;
    uint8_t fh[14];
    int fhlen, fhneed;
    uint64_t remain, phase;
    int opcode, fin, msg_opcode;
    uint8_t key[4];
    uint8_t ctl[126];
    int ctllen;
    msg_t *assembling;
    qnode_t *qh, *qt;
    size_t qoff, qbytes;
} conn_t;

typedef struct {
    char name[80];
    conn_t **viewers;
    int n, cap;
} stream_t;

static conn_t *conns[MAX_FD];
static stream_t streams_[MAX_STREAMS];
static int nstreams, ep;
static uint8_t scratch[256 * 1024];

static msg_t *msg_new(size_t payload_cap) {
    msg_t *m = malloc(sizeof(msg_t) + HEADROOM + payload_cap);
    m->refs = 1;
    m->start = HEADROOM;
    m->len = 0;
    m->cap = payload_cap;
    return m;
}

static void msg_unref(msg_t *m) {
    if (--m->refs == 0) free(m);
}

/* A whole frame as a message (handshake answers, control frames). */
static msg_t *msg_frame(int opcode, const uint8_t *p, size_t n) {
    msg_t *m = msg_new(n + 14);
    size_t hl = frame_header(m->data + m->start, opcode, n, NULL);
    memcpy(m->data + m->start + hl, p, n);
    m->len = hl + n;
    return m;
}

static msg_t *msg_raw(const char *p, size_t n) {
    msg_t *m = msg_new(n);
    memcpy(m->data + m->start, p, n);
    m->len = n;
    return m;
}

static void set_out(conn_t *c, int want) {
    if (c->want_out == want) return;
    c->want_out = want;
    struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.fd = c->fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void conn_close(conn_t *c) {
    if (c->role == R_VIEWER) {
        stream_t *s = &streams_[c->stream];
        conn_t *last = s->viewers[--s->n];
        s->viewers[c->slot] = last;
        last->slot = c->slot;
    }
    while (c->qh) {
        qnode_t *q = c->qh;
        c->qh = q->next;
        msg_unref(q->m);
        free(q);
    }
    if (c->assembling) msg_unref(c->assembling);
    conns[c->fd] = NULL;
    close(c->fd);
    free(c);
}

/* Write queued frames until the socket is full; returns -1 when the connection ended. */
static int write_out(conn_t *c) {
    while (c->qh) {
        msg_t *m = c->qh->m;
        ssize_t w = send(c->fd, m->data + m->start + c->qoff, m->len - c->qoff, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) { set_out(c, 1); return 0; }
            conn_close(c);
            return -1;
        }
        c->qoff += (size_t)w;
        if (c->qoff < m->len) { set_out(c, 1); return 0; }
        qnode_t *q = c->qh;
        c->qh = q->next;
        if (!c->qh) c->qt = NULL;
        c->qbytes -= m->len;
        c->qoff = 0;
        msg_unref(m);
        free(q);
    }
    set_out(c, 0);
    if (c->closing) { conn_close(c); return -1; }
    return 0;
}

static void enqueue(conn_t *c, msg_t *m) {
    qnode_t *q = malloc(sizeof *q);
    q->m = m;
    q->next = NULL;
    m->refs++;
    if (c->qt) c->qt->next = q;
    else c->qh = q;
    c->qt = q;
    c->qbytes += m->len;
}

static int stream_index(const char *name) {
    for (int i = 0; i < nstreams; i++)
        if (!strcmp(streams_[i].name, name)) return i;
    if (nstreams == MAX_STREAMS) return -1;
    snprintf(streams_[nstreams].name, sizeof streams_[nstreams].name, "%s", name);
    return nstreams++;
}

static void broadcast(int stream, msg_t *m) {
    stream_t *s = &streams_[stream];
    for (int i = 0; i < s->n; i++) {
        conn_t *v = s->viewers[i];
        if (v->qbytes > VIEWER_QUEUE_LIMIT) continue;
        int was_empty = v->qh == NULL;
        enqueue(v, m);
        if (was_empty) write_out(v); /* may close v: then s->viewers[i] changed */
        if (i < s->n && s->viewers[i] != v) i--;
    }
}

static const char *header_value(const char *head, const char *name) {
    size_t n = strlen(name);
    for (const char *p = strstr(head, "\r\n"); p && p[2]; p = strstr(p + 2, "\r\n")) {
        if (!strncasecmp(p + 2, name, n) && p[2 + n] == ':') {
            const char *v = p + 3 + n;
            while (*v == ' ') v++;
            return v;
        }
    }
    return NULL;
}

static int handshake(conn_t *c) {
    char *end = strstr(c->head, "\r\n\r\n");
    if (!end) return c->headlen >= (int)sizeof c->head - 1 ? -1 : 0;
    end[2] = 0;
    char path[256] = {0};
    if (sscanf(c->head, "GET %255s HTTP/1.1", path) != 1) return -1;
    const char *key = header_value(c->head, "Sec-WebSocket-Key");
    const char *proto = header_value(c->head, "Sec-WebSocket-Protocol");
    int role = !strncmp(path, "/publish/", 9) ? R_PUBLISHER : !strncmp(path, "/watch/", 7) ? R_VIEWER : -1;
    if (!key || role < 0) {
        const char *nf = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        (void)!send(c->fd, nf, strlen(nf), MSG_NOSIGNAL);
        return -1;
    }
    char keybuf[128];
    size_t kl = strcspn(key, "\r\n ");
    if (kl > 60) return -1;
    memcpy(keybuf, key, kl);
    strcpy(keybuf + kl, WS_GUID);
    uint8_t digest[20];
    sha1((uint8_t *)keybuf, strlen(keybuf), digest);
    char accept[32];
    base64(digest, 20, accept);
    int echo = proto && strstr(proto, SUBPROTOCOL) != NULL;
    char resp[512];
    int n = snprintf(resp, sizeof resp,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n%s\r\n",
                     accept, echo ? "Sec-WebSocket-Protocol: " SUBPROTOCOL "\r\n" : "");
    int si = stream_index(path + (role == R_PUBLISHER ? 9 : 7));
    if (si < 0) return -1;
    c->stream = si;
    c->role = role;
    c->fhneed = 2;
    msg_t *m = msg_raw(resp, (size_t)n);
    enqueue(c, m);
    msg_unref(m);
    if (role == R_VIEWER) {
        stream_t *s = &streams_[si];
        if (s->n == s->cap) {
            s->cap = s->cap ? s->cap * 2 : 64;
            s->viewers = realloc(s->viewers, sizeof(conn_t *) * (size_t)s->cap);
        }
        c->slot = s->n;
        s->viewers[s->n++] = c;
    }
    return write_out(c) < 0 ? 1 : 0;
}

static void control(conn_t *c) {
    if (c->opcode == 9) {
        msg_t *m = msg_frame(10, c->ctl, (size_t)c->ctllen);
        enqueue(c, m);
        msg_unref(m);
    } else if (c->opcode == 8) {
        msg_t *m = msg_frame(8, c->ctl, (size_t)(c->ctllen >= 2 ? 2 : 0));
        enqueue(c, m);
        msg_unref(m);
        c->closing = 1;
    }
}

/* Parse masked client frames; the publisher's data messages are unmasked straight into
 * a message buffer that keeps headroom for the server frame header. Returns -1 if c ended. */
static int frames(conn_t *c, const uint8_t *p, size_t n) {
    while (n) {
        if (c->fhlen < c->fhneed) {
            c->fh[c->fhlen++] = *p++;
            n--;
            if (c->fhlen == 2) {
                int l7 = c->fh[1] & 0x7f;
                c->fhneed = 2 + (l7 == 126 ? 2 : l7 == 127 ? 8 : 0) + ((c->fh[1] & 0x80) ? 4 : 0);
            }
            if (c->fhlen < c->fhneed) continue;
            int l7 = c->fh[1] & 0x7f;
            c->remain = l7 < 126 ? (uint64_t)l7
                        : l7 == 126 ? (uint64_t)c->fh[2] << 8 | c->fh[3] : be64(c->fh + 2);
            if (c->fh[1] & 0x80) memcpy(c->key, c->fh + c->fhneed - 4, 4);
            else memset(c->key, 0, 4);
            c->opcode = c->fh[0] & 0x0f;
            c->fin = c->fh[0] & 0x80;
            c->phase = 0;
            c->ctllen = 0;
            if (c->opcode >= 1 && c->opcode <= 2) c->msg_opcode = c->opcode;
            if (c->opcode < 8 && c->role == R_PUBLISHER) {
                if (!c->assembling) c->assembling = msg_new(c->remain + 14);
                msg_t *m = c->assembling;
                if (m->len + c->remain + 14 > m->cap) {
                    m->cap = m->len + c->remain + 14;
                    m = c->assembling = realloc(m, sizeof(msg_t) + HEADROOM + m->cap);
                }
            }
        } else {
            size_t take = c->remain < n ? (size_t)c->remain : n;
            if (c->opcode >= 8) {
                size_t room = sizeof c->ctl - (size_t)c->ctllen;
                size_t k = take < room ? take : room;
                memcpy(c->ctl + c->ctllen, p, k);
                mask_bytes(c->ctl + c->ctllen, k, c->key, c->phase);
                c->ctllen += (int)k;
            } else if (c->role == R_PUBLISHER) {
                msg_t *m = c->assembling;
                /* payload goes after room for the longest (10-byte) server header */
                uint8_t *dst = m->data + m->start + 10 + m->len;
                memcpy(dst, p, take);
                mask_bytes(dst, take, c->key, c->phase);
                m->len += take;
            }
            c->phase += take;
            p += take;
            n -= take;
            c->remain -= take;
        }
        if (c->fhlen == c->fhneed && c->remain == 0) {
            c->fhlen = 0;
            c->fhneed = 2;
            if (c->opcode >= 8) {
                control(c);
                if (write_out(c) < 0) return -1;
            } else if (c->fin && c->role == R_PUBLISHER) {
                msg_t *m = c->assembling;
                c->assembling = NULL;
                uint8_t h[10];
                size_t hl = frame_header(h, c->msg_opcode, m->len, NULL);
                m->start = m->start + 10 - hl;
                memcpy(m->data + m->start, h, hl);
                m->len += hl;
                broadcast(c->stream, m);
                msg_unref(m);
            }
        }
    }
    return 0;
}

static void on_readable(conn_t *c) {
    for (int rounds = 0; rounds < 8; rounds++) {
        if (c->role == R_HANDSHAKE) {
            ssize_t r = recv(c->fd, c->head + c->headlen, sizeof c->head - 1 - (size_t)c->headlen, 0);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
            if (r <= 0) { conn_close(c); return; }
            c->headlen += (int)r;
            c->head[c->headlen] = 0;
            char *end = strstr(c->head, "\r\n\r\n");
            size_t used = end ? (size_t)(end + 4 - c->head) : 0;
            int rc = handshake(c);
            if (rc < 0) { conn_close(c); return; }
            if (rc > 0) return;
            if (end && (size_t)c->headlen > used) {
                if (frames(c, (uint8_t *)c->head + used, (size_t)c->headlen - used) < 0) return;
            }
            if (!end) continue;
            continue;
        }
        ssize_t r = recv(c->fd, scratch, sizeof scratch, 0);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (r <= 0) { conn_close(c); return; }
        if (frames(c, scratch, (size_t)r) < 0) return;
        if ((size_t)r < sizeof scratch) return;
    }
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: floor PORT [MAX_SECONDS]\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    alarm(argc > 2 ? (unsigned)atoi(argv[2]) : 7200);
    raise_nofile();
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 511) < 0) {
        perror("floor: listen");
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    struct epoll_event evs[512];
    for (;;) {
        int n = epoll_wait(ep, evs, 512, 1000);
        for (int k = 0; k < n; k++) {
            int fd = evs[k].data.fd;
            if (fd == lfd) {
                for (int j = 0; j < 64; j++) {
                    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0) break;
                    if (cfd >= MAX_FD) { close(cfd); continue; }
                    set_nodelay(cfd);
                    conn_t *c = calloc(1, sizeof *c);
                    c->fd = cfd;
                    conns[cfd] = c;
                    struct epoll_event ev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &ev);
                }
                continue;
            }
            conn_t *c = conns[fd];
            if (!c) continue;
            if (evs[k].events & EPOLLOUT) {
                if (write_out(c) < 0) continue;
            }
            if (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
        }
    }
}
