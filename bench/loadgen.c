/* loadgen -- a POP3 load generator in C, so that the client is never the
 * bottleneck (an asyncio client tops out near 7,000 sessions/s here).
 *
 *   loadgen login PORT CLIENTS SECONDS USERFMT PASSWORD
 *       each client loops connect, USER, PASS, STAT, QUIT with its own user
 *       (USERFMT is a printf format taking the client number, e.g. user%d)
 *   loadgen retr PORT CLIENTS SECONDS USERFMT PASSWORD
 *       each client logs in, LISTs, RETRs every message (checking the
 *       octets received, un-stuffed, against LIST), QUITs, and starts over
 *   loadgen idle PORT CLIENTS 0 USERFMT PASSWORD
 *       log CLIENTS sessions in (each its own user), print "ready", then
 *       hold them open until stdin closes
 *   ... PASSWORD tls
 *       the same over implicit TLS (POP3S, OpenSSL): a full handshake per
 *       session, no session resumption, the certificate not checked
 *
 * One thread, epoll, one command at a time per client (no pipelining: the
 * way ordinary clients talk). Prints one line of key=value results:
 * sessions, bytes, messages, errors, seconds, cpu (this process's CPU
 * seconds, to report the load generator's own share).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

enum mode { LOGIN, RETR, IDLE };
enum step { GREETING, USER_SENT, PASS_SENT, STAT_SENT, LIST_SENT, RETR_OK, RETR_BODY, QUIT_SENT, HOLDING };

#define RBUF (256 * 1024)
#define MAX_MESSAGES 100000

struct client {
    int id, fd;
    enum step step;
    char *buf;            /* input not yet consumed */
    size_t len;
    long *sizes;          /* LIST sizes, 1-based numbering -> index n-1 */
    int count, current;   /* messages listed; the one being fetched (0-based) */
    long body_bytes;      /* octets of the current message so far, un-stuffed */
    int line_pos;         /* octets of the current body line so far */
    char first[3];        /* its first octets */
    SSL *ssl;             /* with tls: the connection, NULL before it starts */
    int handshaking;      /* with tls: the handshake is not over yet */
};

static enum mode mode;
static int port, nclients;
static const char *userfmt, *password;
static int epfd;
static SSL_CTX *tls; /* NULL: cleartext */
static long sessions, bytes_total, messages, errors, logged_in;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void start(struct client *c);

static void send_line(struct client *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void send_line(struct client *c, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 2, fmt, ap);
    va_end(ap);
    line[n++] = '\r';
    line[n++] = '\n';
    /* a command is tiny: the socket buffer always takes it whole */
    if (c->ssl ? SSL_write(c->ssl, line, n) != n : write(c->fd, line, n) != n)
        die("write");
}

static void finish(struct client *c, int ok)
{
    struct linger lg = {1, 0}; /* no TIME_WAIT on our side: ports stay free */
    if (!ok)
        errors++;
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    close(c->fd);
    c->fd = -1;
    c->len = 0;
    start(c);
}

static void start(struct client *c)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0)
        die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS)
        die("connect");
    c->step = GREETING;
    c->len = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (tls) {
        c->ssl = SSL_new(tls);
        SSL_set_fd(c->ssl, c->fd);
        SSL_set_connect_state(c->ssl);
        c->handshaking = 1;
        ev.events |= EPOLLOUT; /* the connect completing: time to send the ClientHello */
    }
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl");
}

/* a complete line at the start of buf? returns its length with CRLF, or 0 */
static size_t line_at(struct client *c)
{
    char *nl = memchr(c->buf, '\n', c->len);
    return nl ? (size_t)(nl - c->buf) + 1 : 0;
}

static void consume(struct client *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
}

static void next_retr(struct client *c)
{
    if (c->current < c->count) {
        send_line(c, "RETR %d", c->current + 1);
        c->step = RETR_OK;
    } else {
        send_line(c, "QUIT");
        c->step = QUIT_SENT;
    }
}

/* body octets of a RETR reply: un-stuff, count, find the final "." line.
 * Returns the octets used, and sets *done when the terminator was seen. */
static size_t body(struct client *c, const char *p, size_t n, int *done)
{
    const char *end = p + n, *start = p;
    *done = 0;
    while (p < end) {
        const char *nl = memchr(p, '\n', end - p);
        const char *seg_end = nl ? nl + 1 : end;
        size_t seg = seg_end - p;
        for (size_t k = 0; c->line_pos + k < 3 && k < seg; k++)
            c->first[c->line_pos + k] = p[k];
        c->line_pos += seg;
        p = seg_end;
        if (!nl)
            break;
        if (c->line_pos == 3 && memcmp(c->first, ".\r\n", 3) == 0) {
            *done = 1;
            c->line_pos = 0;
            return p - start;
        }
        c->body_bytes += c->line_pos - (c->first[0] == '.' ? 1 : 0);
        c->line_pos = 0;
    }
    return p - start;
}

/* handle whatever complete replies are buffered */
static void advance(struct client *c)
{
    for (;;) {
        if (c->step == RETR_BODY) {
            int done;
            size_t used = body(c, c->buf, c->len, &done);
            bytes_total += used;
            consume(c, used);
            if (!done)
                return;
            if (c->body_bytes != c->sizes[c->current]) {
                fprintf(stderr, "client %d: message %d: %ld octets, LIST said %ld\n", c->id,
                        c->current + 1, c->body_bytes, c->sizes[c->current]);
                errors++;
            }
            messages++;
            c->current++;
            next_retr(c);
            continue;
        }
        if (c->step == LIST_SENT) {
            /* the whole listing: "+OK ...\r\n" lines ".\r\n" */
            char *end = memmem(c->buf, c->len, "\r\n.\r\n", 5);
            if (!end)
                return;
            if (strncmp(c->buf, "+OK", 3) != 0) {
                finish(c, 0);
                return;
            }
            c->count = 0;
            char *p = memchr(c->buf, '\n', c->len) + 1;
            while (p < end + 2 && c->count < MAX_MESSAGES) {
                long number, size;
                if (sscanf(p, "%ld %ld", &number, &size) != 2)
                    break;
                c->sizes[c->count++] = size;
                p = memchr(p, '\n', end + 2 - p) + 1;
            }
            consume(c, end + 5 - c->buf);
            c->current = 0;
            next_retr(c);
            continue;
        }
        size_t n = line_at(c);
        if (!n)
            return;
        int ok = strncmp(c->buf, "+OK", 3) == 0;
        if (!ok) {
            fprintf(stderr, "client %d: %.*s", c->id, (int)n, c->buf);
            consume(c, n);
            finish(c, 0);
            return;
        }
        consume(c, n);
        switch (c->step) {
        case GREETING: {
            char user[128];
            snprintf(user, sizeof user, userfmt, c->id);
            send_line(c, "USER %s", user);
            c->step = USER_SENT;
            break;
        }
        case USER_SENT:
            send_line(c, "PASS %s", password);
            c->step = PASS_SENT;
            break;
        case PASS_SENT:
            if (mode == LOGIN) {
                send_line(c, "STAT");
                c->step = STAT_SENT;
            } else if (mode == RETR) {
                send_line(c, "LIST");
                c->step = LIST_SENT;
            } else {
                c->step = HOLDING;
                logged_in++;
                return;
            }
            break;
        case STAT_SENT:
            send_line(c, "QUIT");
            c->step = QUIT_SENT;
            break;
        case RETR_OK:
            c->step = RETR_BODY;
            c->body_bytes = 0;
            c->line_pos = 0;
            break;
        case QUIT_SENT:
            sessions++;
            finish(c, 1);
            return;
        default:
            return;
        }
    }
}

/* with tls: drive the handshake; 1 when it is over and data can flow */
static int handshake(struct client *c)
{
    int r = SSL_do_handshake(c->ssl);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (r == 1) {
        c->handshaking = 0;
    } else {
        int err = SSL_get_error(c->ssl, r);
        if (err == SSL_ERROR_WANT_WRITE)
            ev.events |= EPOLLOUT;
        else if (err != SSL_ERROR_WANT_READ) {
            fprintf(stderr, "client %d: TLS handshake failed: ", c->id);
            ERR_print_errors_fp(stderr);
            fputc('\n', stderr);
            finish(c, 0);
            return 0;
        }
    }
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die("epoll_ctl");
    return !c->handshaking;
}

/* read(2) or SSL_read, with read's conventions (-1 and EAGAIN: no data yet) */
static ssize_t receive(struct client *c, char *buf, size_t size)
{
    if (!c->ssl)
        return read(c->fd, buf, size);
    int n = SSL_read(c->ssl, buf, size);
    if (n > 0)
        return n;
    int err = SSL_get_error(c->ssl, n);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
        errno = EAGAIN;
        return -1;
    }
    return 0; /* closed, or broken: the same to us */
}

static void readable(struct client *c)
{
    if (c->ssl && c->handshaking && !handshake(c))
        return;
    for (;;) {
        if (c->len == RBUF) { /* a reply line this long is broken */
            finish(c, 0);
            return;
        }
        ssize_t n = receive(c, c->buf + c->len, RBUF - c->len);
        if (n > 0) {
            c->len += n;
            advance(c);
            if (c->fd < 0 || c->step == HOLDING)
                return;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (c->step == HOLDING) {
            fprintf(stderr, "client %d: idle session closed by the server\n", c->id);
            errors++;
            close(c->fd);
            c->fd = -1;
            return;
        }
        fprintf(stderr, "client %d: connection lost at step %d\n", c->id, c->step);
        finish(c, 0);
        return;
    }
}

int main(int argc, char **argv)
{
    if (argc != 7 && !(argc == 8 && strcmp(argv[7], "tls") == 0)) {
        fprintf(stderr, "usage: loadgen login|retr|idle PORT CLIENTS SECONDS USERFMT PASSWORD [tls]\n");
        return 2;
    }
    if (argc == 8) {
        tls = SSL_CTX_new(TLS_client_method());
        SSL_CTX_set_verify(tls, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_session_cache_mode(tls, SSL_SESS_CACHE_OFF);
    }
    mode = strcmp(argv[1], "login") == 0 ? LOGIN : strcmp(argv[1], "retr") == 0 ? RETR : IDLE;
    port = atoi(argv[2]);
    nclients = atoi(argv[3]);
    double seconds = atof(argv[4]);
    userfmt = argv[5];
    password = argv[6];
    epfd = epoll_create1(0);
    struct client *clients = calloc(nclients, sizeof *clients);
    for (int i = 0; i < nclients; i++) {
        clients[i].id = i;
        clients[i].buf = malloc(RBUF);
        clients[i].sizes = mode == RETR ? malloc(sizeof(long) * MAX_MESSAGES) : NULL;
        start(&clients[i]);
    }
    double t0 = now(), deadline = t0 + seconds;
    struct epoll_event events[256];
    int announced = 0;
    for (;;) {
        if (mode != IDLE && now() >= deadline)
            break;
        if (mode == IDLE && !announced && logged_in == nclients) {
            printf("ready sessions=%ld errors=%ld\n", logged_in, errors);
            fflush(stdout);
            announced = 1;
        }
        if (mode == IDLE && announced) {
            char b;
            if (read(0, &b, 1) <= 0)
                break;
            continue;
        }
        int n = epoll_wait(epfd, events, 256, 100);
        for (int i = 0; i < n; i++)
            readable(events[i].data.ptr);
    }
    double elapsed = now() - t0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    printf("sessions=%ld bytes=%ld messages=%ld errors=%ld seconds=%.3f cpu=%.3f\n", sessions,
           bytes_total, messages, errors, elapsed, cpu);
    return 0;
}
