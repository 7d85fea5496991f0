/* A process that rewrites its title as nginx and PostgreSQL do (setproctitle): the title is written over
 * argv and, when it is longer, on into the environment strings (moved aside first); the rest is NUL-padded.
 * Usage: TITLE=... retitle READY_FILE [padding args...]. Writes its pid to READY_FILE, then sleeps. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv)
{
	if (argc < 2 || !getenv("TITLE"))
		return 2;
	const char *ready = strdup(argv[1]);
	char *title = strdup(getenv("TITLE"));
	char *end = argv[0];
	for (int i = 0; i < argc; i++)
		if (argv[i] == end)
			end = argv[i] + strlen(argv[i]) + 1;
	int n = 0;
	for (; environ[n]; n++)
		if (environ[n] == end)
			end = environ[n] + strlen(environ[n]) + 1;
	char **env = malloc((n + 1) * sizeof(char *));
	for (int i = 0; i < n; i++)
		env[i] = strdup(environ[i]);
	env[n] = NULL;
	environ = env;
	size_t room = (size_t)(end - argv[0]) - 1, len = strlen(title);
	if (len > room)
		len = room;
	memcpy(argv[0], title, len);
	memset(argv[0] + len, 0, (size_t)(end - argv[0]) - len);
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", ready);
	FILE *f = fopen(tmp, "w");
	if (!f)
		return 1;
	fprintf(f, "%d\n", getpid());
	fclose(f);
	rename(tmp, ready);
	for (;;)
		pause();
}
