mod tftp;
